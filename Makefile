# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Each creates .venv on first use with the CPU build of torch (never a CUDA one).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: install demo test lint proto clean reference-artifacts

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first and pinned: 2.13.0 is the CPU wheel; the project's range then installs nothing bigger.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/splitvlm demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

proto: $(STAMP)
	$(PY) -m shared.protocol.regen

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Calibration artifacts shipped with the reference model (shared/models/reference-llava/codecs/),
# fitted on 256 training scenes; the services and `splitvlm eval` find them without flags.
REFERENCE_SPECS := 'pca:k=16|int8|zstd' 'kmeans:bits=4|zstd' 'sparse:atoms=256,k=8|int8|zstd' \
	'ae:dim=32|int8|zstd' 'ae:dim=32,vq=256,parts=8|zstd' 'ae:dim=32,vq=4096,parts=8|zstd' \
	'int8|zstd:dict=1' 'salient:k=32|pca:k=16|linear:bits=4,scale=fp16|zstd' \
	'salient:k=24|pca:k=16|linear:bits=4,scale=fp16|zstd' 'salient:k=16|pca:k=16|linear:bits=4,scale=fp16|zstd'
reference-artifacts: $(STAMP)
	@for spec in $(REFERENCE_SPECS); do \
		name=$$(printf '%s' "$$spec" | tr -cs 'A-Za-z0-9' '-'); \
		$(VENV)/bin/splitvlm calibrate --model builtin:reference-llava --synthetic 256 --codec "$$spec" \
			--out shared/models/reference-llava/codecs/$$name || exit 1; \
	done
