"""Shared by the core tests: the smallest model sizes that still build and run both architectures."""

SMALL = dict(hidden=32, intermediate=64, layers=2, heads=2, vision_hidden=32, vision_intermediate=48, vision_heads=2)


def tiny_qwen2_vl():
    """A random Qwen2-VL small enough for unit tests (text mrope_section sums to head_dim / 2)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 6, 6]}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=8),
        image_token_id=151, video_token_id=152, vision_start_token_id=150, bos_token_id=1, eos_token_id=2,
    )
    return Qwen2VLForConditionalGeneration(cfg)
