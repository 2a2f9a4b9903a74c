"""GGUF files served directly: ``vllm serve model.gguf [--tokenizer HF_DIR]``.

``view`` makes the file look like a checkpoint directory to vLLM (config, tokenizer);
``weights`` loads its tensors into mlx-lm's model with quantized blocks kept packed in MLX's
affine format (``blocks``); ``names`` maps llama.cpp's tensor names onto mlx-lm's.
"""

from vllm_metal.gguf.view import GgufError, check_tokenizer, ensure_view, is_gguf_file, is_view

__all__ = ["GgufError", "check_tokenizer", "ensure_view", "is_gguf_file", "is_view"]
