"""Train the reference VLM from scratch on synthetic scenes (CPU, minutes).

    scenes (seeded, on the fly) ─► processor ─► CLIP ViT ─► projector ─┐
                                                                      ├─► Llama ─► answer + </s>
    "USER: <image>×256\\n{question} ASSISTANT:" ─► embeddings ─────────┘
                                                   loss on the answer tokens only

Each image is encoded once and shared by all its questions (the vision tower is
the expensive part on CPU). Every step draws fresh scenes from the training seed
range, so there is no epoch and no overfitting to a fixed set; the held-out
seeds (`scenes.heldout_seeds`) are never drawn.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import DynamicCache, LlavaForConditionalGeneration, LlavaProcessor

from shared.models.tokenizer import EOS_TOKEN
from shared.reference.model import new_reference_model, token_id
from shared.reference.scenes import (
    COLORS,
    PLURALS,
    QA,
    QTYPES,
    SHAPES,
    Scene,
    make_scene,
    tokenize,
    training_seeds,
)
from shared.split.llava import chat_text

IGNORE = -100


@dataclass
class TrainConfig:
    steps: int = 2400
    images_per_step: int = 16
    questions_per_image: int = 6
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup: int = 100
    weight_decay: float = 0.05
    seed: int = 0
    threads: int = 0  # 0: torch's default
    log_every: int = 50
    # Weight of the auxiliary per-patch loss (see `PatchLabels`); the head is dropped after training.
    aux_weight: float = 1.0
    # Weight of the grounding loss on the last layer's attention (see `grounding_targets`).
    ground_weight: float = 1.0
    # Chat template with the question before the image (see `model.QUESTION_FIRST_TEMPLATE`).
    question_first: bool = False


def prompt_text(processor: LlavaProcessor, question: str) -> str:
    return chat_text(processor, question, 1)


class Batcher:
    """Turns scenes into tensors: a shared image prefix, and one text suffix per question.

    The chat template puts the image before the question, and attention is causal, so
    the prefix ``<s> USER: <image>×256`` has the same hidden states whatever question
    follows. It is run once per image and its KV cache is shared by that image's
    questions: exactly the full-sequence loss, at a fraction of the compute.
    """

    def __init__(self, processor: LlavaProcessor, image_token_id: int, tokens_per_image: int) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token_id = image_token_id
        self.eos_id = token_id(self.tokenizer, EOS_TOKEN)
        self.pad_id = int(self.tokenizer.pad_token_id)
        sample = self.full_prompt_ids("is there a red circle?", tokens_per_image)
        last_image = max(i for i, t in enumerate(sample) if t == image_token_id)
        self.prefix_ids = sample[: last_image + 1]
        # Image first (LLaVA-1.5 order): the prefix is shared by all questions of an image.
        other = self.full_prompt_ids("how many objects are there?", tokens_per_image)
        self.shared_prefix = other[: last_image + 1] == self.prefix_ids
        self._suffix_cache: dict[str, list[int]] = {}
        self.tokens_per_image = tokens_per_image

    def full_prompt_ids(self, question: str, tokens_per_image: int) -> list[int]:
        text = prompt_text(self.processor, question)
        ids: list[int] = []
        for t in self.tokenizer(text, add_special_tokens=True)["input_ids"]:
            ids.extend([t] * tokens_per_image if t == self.image_token_id else [t])
        return ids

    def suffix_ids(self, question: str) -> list[int]:
        ids = self._suffix_cache.get(question)
        if ids is None:
            full = self.full_prompt_ids(question, self.tokens_per_image)
            if full[: len(self.prefix_ids)] != self.prefix_ids:
                raise ValueError(
                    f"the chat template does not start with the shared image prefix: {question!r}"
                )
            ids = full[len(self.prefix_ids) :]
            self._suffix_cache[question] = ids
        return ids

    def full(self, qas: list[QA]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Whole sequences (prompt with image tokens + answer), right-padded."""
        rows = [
            (self.full_prompt_ids(qa.question, self.tokens_per_image), self.answer_ids(qa.answer))
            for qa in qas
        ]
        return self._pad(rows)

    def answer_ids(self, answer: str) -> list[int]:
        return [*self.tokenizer(answer, add_special_tokens=False)["input_ids"], self.eos_id]

    def suffixes(self, qas: list[QA]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Question + answer tokens per QA, right-padded; labels mark the answer tokens."""
        return self._pad([(self.suffix_ids(qa.question), self.answer_ids(qa.answer)) for qa in qas])

    def _pad(
        self, rows: list[tuple[list[int], list[int]]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        width = max(len(q) + len(a) for q, a in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (q, a) in enumerate(rows):
            seq = q + a
            ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, len(q) : len(seq)] = torch.tensor(a)
            mask[i, : len(seq)] = 1
        return ids, labels, mask

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        return self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]


class PatchLabels:
    """Per-patch targets for deep supervision of the vision tower: which colour and shape covers each patch.

    Trained from scratch, the LLM first learns answer priors and only slowly starts reading
    the image: for hundreds of steps the vision tower gets almost no useful gradient. A linear
    probe on its output that must name the colour and shape under every patch gives it a
    direct signal from the first step (deep supervision; cf. Lee et al., "Deeply-Supervised
    Nets", 2015). The probe is discarded after training; the saved model is a plain LLaVA.
    """

    # Fraction of the enclosing radius that is inside each shape; a patch counts when its
    # centre is within that radius plus half a patch (so a 2x2-patch object labels 4 patches).
    INSIDE: ClassVar[dict[str, float]] = {"circle": 0.85, "square": 0.7, "triangle": 0.45, "star": 0.4}

    def __init__(self, grid: int, patch: int) -> None:
        self.half_patch = patch / 2
        centres = (torch.arange(grid, dtype=torch.float32) + 0.5) * patch
        self.ys, self.xs = torch.meshgrid(centres, centres, indexing="ij")

    def object_masks(self, scene: Scene) -> torch.Tensor:
        """``[objects, patches]``: which patches each object covers."""
        masks = torch.zeros((len(scene.objects), self.xs.numel()), dtype=torch.bool)
        for k, obj in enumerate(scene.objects):
            reach = obj.radius * self.INSIDE[obj.shape] + self.half_patch
            masks[k] = ((self.xs - obj.cx) ** 2 + (self.ys - obj.cy) ** 2 <= reach**2).flatten()
        return masks

    def __call__(self, scenes: list[Scene]) -> tuple[torch.Tensor, torch.Tensor]:
        colors = torch.zeros((len(scenes), *self.xs.shape), dtype=torch.long)  # 0 = background
        shapes = torch.zeros_like(colors)
        for i, scene in enumerate(scenes):
            for obj in scene.objects:
                reach = obj.radius * self.INSIDE[obj.shape] + self.half_patch
                inside = (self.xs - obj.cx) ** 2 + (self.ys - obj.cy) ** 2 <= reach**2
                colors[i][inside] = COLORS.index(obj.color) + 1
                shapes[i][inside] = SHAPES.index(obj.shape) + 1
        return colors.flatten(1), shapes.flatten(1)


def evidence(scene: Scene, qa: QA) -> list[int]:
    """Indices of the objects a question's answer depends on (empty: nothing to look at)."""
    words = set(tokenize(qa.question))
    colors = words & set(COLORS)
    shapes = {s for s in SHAPES if s in words or PLURALS[s] in words}
    found = [
        k
        for k, o in enumerate(scene.objects)
        if (not colors or o.color in colors) and (not shapes or o.shape in shapes)
    ]
    if not found and qa.qtype == "presence":  # "no": the evidence is what is there instead
        found = [k for k, o in enumerate(scene.objects) if o.color in colors or o.shape in shapes]
    return found


def grounding_targets(labels: PatchLabels, scenes: list[Scene]) -> torch.Tensor:
    """``[qas, patches]`` masks of the patches each QA's answer depends on.

    Why: the language model has to learn to look up the right patches among 256 before
    any answer gets better than the per-question prior, and from scratch that plateau
    lasts thousands of steps. Telling the last layer's attention where to look (the
    union of the evidence objects' patches) removes the plateau; the attention weights
    themselves stay free, only their mass on the evidence is rewarded.
    """
    rows = []
    for scene in scenes:
        masks = labels.object_masks(scene)
        for qa in scene.qas:
            picked = evidence(scene, qa)
            rows.append(masks[picked].any(0) if picked else torch.zeros(masks.shape[1], dtype=torch.bool))
    return torch.stack(rows)


def forward_loss(
    model: LlavaForConditionalGeneration,
    batcher: Batcher,
    pixel_values: torch.Tensor,
    ids: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    image_index: torch.Tensor,
    probe: torch.nn.Module | None = None,
    patch_targets: tuple[torch.Tensor, torch.Tensor] | None = None,
    ground: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Answer cross-entropy, patch-probe loss, grounding loss (None when not asked), exact match.

    ``ids``/``labels``/``mask`` are `Batcher.suffixes` (image-first template, shared prefix)
    or `Batcher.full` (question-first template). `ground` (``[qas, patches]`` bool) needs
    the language model in eager attention.
    """
    cfg = model.config
    vision = model.model.vision_tower(pixel_values, output_hidden_states=True)
    patches = vision.hidden_states[cfg.vision_feature_layer][:, 1:]
    aux = None
    if probe is not None and patch_targets is not None:
        logits_c, logits_s = probe(patches).split([len(COLORS) + 1, len(SHAPES) + 1], dim=-1)
        aux = torch.nn.functional.cross_entropy(logits_c.flatten(0, 1), patch_targets[0].flatten())
        aux = aux + torch.nn.functional.cross_entropy(logits_s.flatten(0, 1), patch_targets[1].flatten())
    feats = model.model.multi_modal_projector(patches)  # [images, tokens, text_hidden]
    embed = model.get_input_embeddings()
    lm = model.model.language_model
    want_attn = ground is not None
    if batcher.shared_prefix:
        prefix = torch.tensor(batcher.prefix_ids).expand(feats.shape[0], -1)
        prefix_embeds = embed(prefix).masked_scatter(
            (prefix == batcher.image_token_id).unsqueeze(-1), feats.to(embed.weight.dtype)
        )
        prefix_out = lm(inputs_embeds=prefix_embeds, use_cache=True)
        shared = DynamicCache()
        for layer_idx, layer in enumerate(prefix_out.past_key_values.layers):
            shared.update(layer.keys[image_index], layer.values[image_index], layer_idx)
        p_len, s_len = prefix.shape[1], ids.shape[1]
        attention = torch.cat([torch.ones(ids.shape[0], p_len, dtype=mask.dtype), mask], dim=1)
        positions = torch.arange(p_len, p_len + s_len)
        out = lm(
            inputs_embeds=embed(ids),
            attention_mask=attention,
            past_key_values=shared,
            position_ids=positions.expand(ids.shape[0], -1),
            cache_position=positions,
            output_attentions=want_attn,
        )
        image_cols = (prefix[0] == batcher.image_token_id).nonzero().squeeze(1).expand(ids.shape[0], -1)
    else:
        image_pos = ids == batcher.image_token_id
        embeds = embed(ids).masked_scatter(image_pos.unsqueeze(-1), feats[image_index].to(embed.weight.dtype))
        out = lm(inputs_embeds=embeds, attention_mask=mask, output_attentions=want_attn)
        image_cols = image_pos.nonzero(as_tuple=True)[1].view(ids.shape[0], -1)
    hidden = out.last_hidden_state
    # Position t predicts token t+1; only answer positions reach lm_head.
    target = labels[:, 1:]
    pick = target != IGNORE
    logits = model.lm_head(hidden[:, :-1][pick])
    loss = torch.nn.functional.cross_entropy(logits.float(), target[pick])
    right = torch.zeros_like(target, dtype=torch.bool)
    right[pick] = logits.argmax(-1) == target[pick]
    exact = (right | ~pick).all(dim=1)
    ground_loss = None
    if ground is not None:
        # The last layer's attention from the row that predicts the first answer token,
        # over the image positions: reward its mass on the evidence patches.
        answer_row = (labels != IGNORE).int().argmax(dim=1) - 1
        last = out.attentions[-1]  # [qas, heads, queries, keys]
        rows = last[torch.arange(last.shape[0]), :, answer_row]  # [qas, heads, keys]
        on_image = rows.gather(2, image_cols.unsqueeze(1).expand(-1, rows.shape[1], -1))
        mass = (on_image * ground[:, None, :]).sum(-1).mean(1)
        valid = ground.any(1)
        if bool(valid.any()):
            ground_loss = -torch.log(mass[valid] + 1e-6).mean()
    return loss, aux, ground_loss, exact


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def train(
    cfg: TrainConfig, log_path: Path | None = None
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, processor = new_reference_model(cfg.seed, cfg.question_first)
    model.train()
    image_token_id = int(model.config.image_token_index)
    batcher = Batcher(processor, image_token_id, int(model.config.image_seq_length))
    vision_cfg: Any = model.config.vision_config
    labels_for = PatchLabels(vision_cfg.image_size // vision_cfg.patch_size, vision_cfg.patch_size)
    probe = torch.nn.Linear(vision_cfg.hidden_size, len(COLORS) + len(SHAPES) + 2) if cfg.aux_weight else None
    if cfg.ground_weight:
        model.set_attn_implementation("eager")  # attention weights for the grounding loss
    params = [*model.named_parameters(), *(probe.named_parameters("probe") if probe else [])]
    decay = [p for n, p in params if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in params if not (p.ndim >= 2 and "embed" not in n)]
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    seeds = training_seeds(cfg.seed * 1_000_000)
    log = open(log_path, "w") if log_path else None  # noqa: SIM115
    started = time.perf_counter()
    window_loss, window_aux, window_ground, window_exact, window_n = 0.0, 0.0, 0.0, 0.0, 0
    per_type: dict[str, list[int]] = {q: [0, 0] for q in QTYPES}
    columns = (
        TextColumn("[bold]train[/]"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns) as progress:
        task = progress.add_task("train", total=cfg.steps, status="")
        for step in range(cfg.steps):
            scenes = [
                make_scene(next(seeds), n_questions=cfg.questions_per_image)
                for _ in range(cfg.images_per_step)
            ]
            qas = [qa for s in scenes for qa in s.qas]
            image_index = torch.tensor([i for i, s in enumerate(scenes) for _ in s.qas])
            pixel_values = batcher.pixels([s.image for s in scenes])
            ids, labels, mask = batcher.suffixes(qas) if batcher.shared_prefix else batcher.full(qas)
            for group in optim.param_groups:
                group["lr"] = lr_at(step, cfg)
            targets = labels_for(scenes) if probe is not None else None
            ground = grounding_targets(labels_for, scenes) if cfg.ground_weight else None
            loss, aux, ground_loss, exact = forward_loss(
                model, batcher, pixel_values, ids, labels, mask, image_index, probe, targets, ground
            )
            total = loss
            if aux is not None:
                total = total + cfg.aux_weight * aux
            if ground_loss is not None:
                total = total + cfg.ground_weight * ground_loss
            optim.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
            optim.step()
            window_loss += float(loss.detach()) * len(qas)
            window_aux += float(aux.detach()) if aux is not None else 0.0
            window_ground += float(ground_loss.detach()) if ground_loss is not None else 0.0
            window_exact += float(exact.float().sum())
            for qa, ok in zip(qas, exact.tolist(), strict=True):
                per_type[qa.qtype][0] += int(ok)
                per_type[qa.qtype][1] += 1
            window_n += len(qas)
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                row = {
                    "step": step + 1,
                    "loss": window_loss / window_n,
                    "train_acc": window_exact / window_n,
                    "patch_loss": window_aux / (window_n / len(qas)),
                    "ground_loss": window_ground / (window_n / len(qas)),
                    "train_acc_by_type": {q: round(r / n, 3) for q, (r, n) in per_type.items() if n},
                    "lr": lr_at(step, cfg),
                    "elapsed_s": round(time.perf_counter() - started, 1),
                }
                if log:
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                progress.update(task, status=f"loss {row['loss']:.3f} acc {row['train_acc']:.3f}")
                window_loss, window_aux, window_ground, window_exact, window_n = 0.0, 0.0, 0.0, 0.0, 0
                per_type = {q: [0, 0] for q in QTYPES}
            progress.advance(task)
    if log:
        log.close()
    if cfg.ground_weight:
        model.set_attn_implementation("sdpa")
    model.eval()
    return model, processor


def config_dict(cfg: TrainConfig) -> dict[str, object]:
    return asdict(cfg)
