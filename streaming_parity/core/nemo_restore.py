"""NeMo's model, restored from a checked ``.nemo`` for inference as the harness drives it (needs torch + NeMo).

One restore for every user: the reference backend (``streaming_parity.backends.nemo``) and the ONNX exporters
(``streaming_parity.backends.onnx.export``, ``peer_export``), which trace the same model the reference runs.
"""

from __future__ import annotations

import copy

from streaming_parity.core.nemo_file import NemoArchive, mapped_weights_connector
from streaming_parity.core.system.nemo_quiet import quiet_nemo


def restore_for_inference(archive: NemoArchive, *, device: str = "cpu"):
    """The ``ASRModel`` of ``archive`` (already checked by ``inspect_nemo``: an unsafe archive is refused before NeMo
    instantiates anything), on ``device``, set up as NeMo's own cache-aware streaming sets it up.

    - eval mode: in train mode NeMo samples a random attention context every forward;
    - dither 0 and ``pad_to`` 0, as ``CacheAwareStreamingAudioBuffer`` sets them;
    - NeMo's ``greedy`` decoding strategy (``GreedyRNNTInfer``): the per-frame loop whose decoder/joint call order
      the other backends reproduce;
    - memory-mapped weights (``mapped_weights_connector``): one copy at the peak instead of NeMo's two
      (initialised, then loaded).
    """
    import torch
    from omegaconf import open_dict

    with quiet_nemo():
        from nemo.collections.asr.models import ASRModel

        model = ASRModel.restore_from(str(archive.path), map_location=torch.device(device),
                                      save_restore_connector=mapped_weights_connector())
        model.eval()
        model.preprocessor.featurizer.dither = 0.0
        model.preprocessor.featurizer.pad_to = 0
        decoding = copy.deepcopy(model.cfg.decoding)
        with open_dict(decoding):
            decoding.strategy = "greedy"  # GreedyRNNTInfer: the loop the other backends reproduce
        model.change_decoding_strategy(decoding, verbose=False)
    return model


def tokenizer_vocabulary(model) -> list[str]:
    """The restored model's tokenizer pieces, in id order (the blank, id ``len(pieces)``, not among them)."""
    tokenizer = model.tokenizer
    if hasattr(tokenizer, "vocab"):
        return list(tokenizer.vocab)
    return [tokenizer.ids_to_tokens([i])[0] for i in range(tokenizer.vocab_size)]
