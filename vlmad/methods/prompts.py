"""Prompt ensembles as data, and text features computed once per (class name, prompt set).

Sentences are built state-major, ``template.format(state.format(name))``, as in every reference.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmad.backbones import ClipBackbone
from vlmad.backbones.cache import load_entry, save_entry

log = logging.getLogger(__name__)

NORMAL_STATES = [
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
]
WINCLIP_ANOMALOUS = ["damaged {}", "{} with flaw", "{} with defect", "{} with damage"]
APRILGAN_ANOMALOUS = ["damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage"]

# The last 8 templates of both WinCLIP lists (same order in both).
_SIZE_AND_PURPOSE = [
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
]
# anomalib 2.7.0's list, verbatim: entry 9 duplicates entry 8 (a typo that doubles that prompt's weight) and
# "a cropped photo of a {}." is missing. Kept for parity; `winclip_22` is the clean list.
WINCLIP_ANOMALIB_TEMPLATES = [
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    *_SIZE_AND_PURPOSE,
]
# caoyunkang/WinClip's 22 templates (both articles for every adjective, no duplicate), with periods.
WINCLIP_22_TEMPLATES = [
    f"a {adj}photo of {art} {{}}."
    for adj in ["cropped ", "close-up ", "bright ", "dark ", "jpeg corrupted ", "blurry ", ""]
    for art in ["a", "the"]
] + _SIZE_AND_PURPOSE
# ByChelsea/VAND-APRIL-GAN prompt_ensemble.py, in the reference's order (summation order matters for bit parity).
APRILGAN_TEMPLATES = [
    "a bad photo of a {}.",
    "a low resolution photo of the {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a bright photo of a {}.",
    "a dark photo of the {}.",
    "a photo of my {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a photo of one {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of a large {}.",
    "a blurry photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "a dark photo of a {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
]


@dataclass(frozen=True)
class PromptSet:
    """State words x templates for the normal and anomalous classes."""

    normal_states: tuple[str, ...]
    anomalous_states: tuple[str, ...]
    templates: tuple[str, ...]

    def sentences(self, name: str) -> tuple[list[str], list[str]]:
        """(normal, anomalous) sentences for an object name, state-major."""

        def build(states: tuple[str, ...]) -> list[str]:
            return [t.format(s.format(name)) for s in states for t in self.templates]

        return build(self.normal_states), build(self.anomalous_states)


PROMPT_SETS: dict[str, PromptSet] = {
    "winclip_anomalib": PromptSet(tuple(NORMAL_STATES), tuple(WINCLIP_ANOMALOUS), tuple(WINCLIP_ANOMALIB_TEMPLATES)),
    "winclip_22": PromptSet(tuple(NORMAL_STATES), tuple(WINCLIP_ANOMALOUS), tuple(WINCLIP_22_TEMPLATES)),
    "aprilgan": PromptSet(tuple(NORMAL_STATES), tuple(APRILGAN_ANOMALOUS), tuple(APRILGAN_TEMPLATES)),
}


def get_prompt_set(prompts: str | PromptSet | dict) -> PromptSet:
    """A shipped set by name, a PromptSet, or a dict with normal_states/anomalous_states/templates lists."""
    if isinstance(prompts, PromptSet):
        return prompts
    if isinstance(prompts, str):
        if prompts not in PROMPT_SETS:
            raise ValueError(f"unknown prompt set {prompts!r}; shipped: {sorted(PROMPT_SETS)}")
        return PROMPT_SETS[prompts]
    return PromptSet(*(tuple(prompts[k]) for k in ("normal_states", "anomalous_states", "templates")))


@torch.no_grad()
def ensemble_text_features(
    backbone: ClipBackbone, prompts: PromptSet, name: str, normalize_prompts: bool, renormalize: bool
) -> Tensor:
    """Class prototypes from a prompt ensemble.

    Args:
        backbone: frozen CLIP.
        prompts: the ensemble.
        name: object name put into the prompts.
        normalize_prompts: L2-normalise each sentence embedding before averaging (APRIL-GAN, CLIP); WinCLIP
            in anomalib averages the raw embeddings.
        renormalize: L2-normalise the averaged prototype (APRIL-GAN).

    Returns:
        (2, D) prototypes, rows [normal, anomalous].
    """
    protos = []
    for sentences in prompts.sentences(name):
        emb = backbone.encode_text(backbone.tokenize(sentences))  # (N, D)
        if normalize_prompts:
            emb = F.normalize(emb, dim=-1)
        proto = emb.mean(dim=0)
        protos.append(F.normalize(proto, dim=-1) if renormalize else proto)
    return torch.stack(protos)  # (2, D)


class TextFeatureCache:
    """Prototypes keyed by (backbone signature, prompt set, name, options), in memory and optionally on disk.

    Text features do not depend on images, so they are encoded once per class name and reused across
    batches, categories and few-shot reference draws (anomalib re-encodes all prompts on every setup); with
    a ``directory`` they are also shared by the jobs of a sweep (files written atomically).
    """

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory else None
        self._store: dict[str, Tensor] = {}
        self.encoded = 0  # how many prototype pairs were actually computed (not loaded)

    def get(
        self, backbone: ClipBackbone, prompts: PromptSet, name: str, normalize_prompts: bool, renormalize: bool
    ) -> Tensor:
        """Cached :func:`ensemble_text_features`."""
        raw = repr((backbone.signature(), prompts, name, normalize_prompts, renormalize))
        key = hashlib.sha1(raw.encode()).hexdigest()[:24]
        if key in self._store:
            return self._store[key]
        path = self.directory / f"{key}.pt" if self.directory else None
        feats = load_entry(path, raw, "text-feature cache entry") if path is not None else None
        if isinstance(feats, Tensor):
            feats = feats.to(backbone.device)
        else:
            feats = ensemble_text_features(backbone, prompts, name, normalize_prompts, renormalize)
            self.encoded += 1
            if path is not None:
                try:
                    save_entry(path, raw, feats.cpu())
                except OSError as err:  # e.g. a read-only shared cache: keep the prototypes in memory only
                    log.warning(
                        "text-feature cache %s is not writable (%s): keeping prototypes in memory", self.directory, err
                    )
                    self.directory = None
        self._store[key] = feats
        return feats
