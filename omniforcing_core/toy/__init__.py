"""The whole OmniForcing recipe at toy scale (issue #6), pure torch, CPU-sized.

world    - procedural audio-visual clips with exact event times and captions
codecs   - tiny video/audio autoencoders with LTX-2's time base + a procedural vocoder
textenc  - tiny caption encoder ([B, L, caption_channels] features)
stages   - teacher flow matching, ODE pairs, Stage II causal ODE regression, Stage III Self-Forcing DMD
train    - resumable, deterministic runner (safetensors + JSON state), torchrun / FSDP2 path
configs  - stage configs: the toy recipe and the real LTX-2 19B one
report   - synchrony / fidelity / speed table, sink ablation, export of the embedded default
CLI: python -m omniforcing_core.toy --help
"""
