"""OmniForcing core: a plain PyTorch library (no ComfyUI import)."""
