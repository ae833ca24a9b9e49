"""Qwen2-VL's processor (tokenizer + image processor) for ``qwen-image-edit-plus`` without torchvision.

``QwenImageEditPlusPipeline`` encodes prompts with a ``Qwen2VLProcessor`` (text and condition
images, no videos). transformers 5.x cannot construct that class without torchvision: its third
sub-processor, the video processor, exists only with torchvision, and ``ProcessorMixin`` checks
every sub-processor's class (even ``None``) against it. The image part has a pure-PIL backend
(``Qwen2VLImageProcessorPil``, what ``Qwen2VLImageProcessor`` falls back to without
torchvision). So, where torchvision is missing, :func:`load_image_only_processor` builds the same
processor class from the checkpoint's ``processor/`` files with the video processor left out;
the pipeline never sends videos. With torchvision installed nothing here is used: diffusers loads
the processor itself.

The image-only processor saves (``save_pretrained``) the tokenizer and the image processor's
``preprocessor_config.json`` into its folder, which is what :func:`load_image_only_processor`
reads back.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any


def has_torchvision() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def image_only_processor(image_processor, tokenizer, chat_template: str | None = None):
    """A ``Qwen2VLProcessor`` of ``image_processor`` (``Qwen2VLImageProcessorPil``) and ``tokenizer``
    with no video processor; ``save_pretrained`` writes both sub-processors' files."""
    from transformers import Qwen2VLProcessor

    class _NoVideoCheck(Qwen2VLProcessor):  # skips only the class check of the absent video processor
        def check_argument_for_proper_class(self, argument_name: str, argument: Any):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    processor = _NoVideoCheck(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                              chat_template=chat_template)
    processor.__class__ = Qwen2VLProcessor  # the pipeline (and model_index.json) see the real class

    def save_pretrained(directory: str | Path, **_: Any) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(directory)
        image_processor.save_pretrained(directory)

    processor.save_pretrained = save_pretrained  # instance attribute: diffusers calls it by name
    return processor


def load_image_only_processor(path: str | Path, subfolder: str = "processor"):
    """:func:`image_only_processor` from a pipeline folder (or hub id) with a ``processor/`` subfolder."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), subfolder=subfolder)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(path), subfolder=subfolder)
    except (OSError, ValueError) as e:
        raise OSError(
            f"{path}: could not read the Qwen2-VL processor from its {subfolder}/ folder ({e}). "
            f"transformers builds the pipeline's own Qwen2VLProcessor only with torchvision, which is "
            f"not installed, so flowrl reads the tokenizer and preprocessor_config.json from there. "
            f"Fix: install torchvision (the build matching your torch), or make sure {subfolder}/ "
            f"holds the tokenizer files and preprocessor_config.json.") from e
    return image_only_processor(image_processor, tokenizer, getattr(tokenizer, "chat_template", None))
