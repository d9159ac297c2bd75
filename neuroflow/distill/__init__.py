"""Sparse manifold distillation: fine-tune a model to stay faithful under Architecture B.

Architecture B (encoder and pooling head see only the tokens the gate kept) is the fastest
architecture but collapses on weights trained densely. Distillation fine-tunes a copy of the model
(the student) against the frozen dense original (the teacher) while the gate drops tokens, with the
gate's threshold and EMA decay drawn at random per clip (the method's sparse manifold
distillation: threshold ~ U(0.0001, 0.35), decay ~ U(0.001, 0.1), gate reset per clip)::

    from neuroflow.distill import DistillConfig, distill

    result = distill(DistillConfig(teacher="ckpt/siglip-base", videos=["clips/"], val_videos=["heldout/"],
                                   out="runs/distill-1", resolutions=[224, 448], epochs=2))
    result.student_folder        # Hugging Face folder: from_pretrained + NeuroFlow(model, arch="B")

Modules: :mod:`.config` (settings, errors), :mod:`.data` (videos, clips, decoding),
:mod:`.sparse` (the differentiable Architecture B forward), :mod:`.losses`, :mod:`.params` (what
trains), :mod:`.evaluate` (the forgetting guard's measurement), :mod:`.checkpoint`, :mod:`.logs`
(CSV/JSON logs and the curves PNG), :mod:`.trainer` (the loop). The command line is
``neuroflow distill`` (:mod:`neuroflow.commands.distill`).
"""

from __future__ import annotations

from .config import DistillConfig, DistillError
from .trainer import DistillResult, Trainer


def distill(config: DistillConfig) -> DistillResult:
    """Run (or, with ``config.resume``, continue) a distillation; see :class:`DistillConfig`.

    Raises:
        DistillError: bad input (teacher, videos, options, checkpoint), with a one-line message.
    """
    return Trainer(config).run()


__all__ = ["DistillConfig", "DistillError", "DistillResult", "Trainer", "distill"]
