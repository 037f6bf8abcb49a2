"""The whole OmniForcing recipe at toy scale (issue #6), pure torch, CPU-sized.

world    - procedural audio-visual clips with exact event times and captions
codecs   - tiny video/audio autoencoders with LTX-2's time base + a procedural vocoder (level-limited)
textenc  - tiny caption encoder ([B, L, caption_channels] features)
default  - the embedded trained default (student, caption encoder, codecs as streaming Decoders)
stages   - teacher flow matching, ODE pairs, Stage II causal ODE regression, Stage III Self-Forcing DMD
distributed - process group, FSDP2 sharding, gradient averaging and clipping
train    - resumable, deterministic runner (safetensors + JSON state), torchrun / FSDP2 path
configs  - stage configs of the toy recipe
report   - synchrony / fidelity / speed table, sink ablation, export of the embedded default
CLI: python -m omniforcing_core.toy --help
"""
