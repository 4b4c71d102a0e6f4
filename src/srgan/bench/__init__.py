"""Speed benchmark (``make bench``): training steps per precision against the machine's matmul limits,
the input pipeline's feed ratio, tiled upscaling, bf16 quality and an optional PyTorch peer.

Modules: timing (time calls, statistics, CPU meter), limits (CPU flags, matmul FLOP/s per dtype),
steps (the trainer's own steps, FLOP convention), pipeline (feed ratio), upscale (speed, peak RSS),
quality (float32 vs mixed_bfloat16 PSNR-Y), torch_peer (the same networks in PyTorch), child (one
measurement), report (table, reports/bench.json), cli (options, orchestration).

Every measurement runs in a fresh process (``python -m srgan.bench.child``, JSON spec on stdin, JSON
result on the last stdout line): Keras' precision policy, ``TF_ENABLE_ONEDNN_OPTS`` (read at import)
and TF's thread pools are process-wide, and peak memory only compares between fresh processes. The
package imports nothing itself, so the PyTorch peer can run under an interpreter without TensorFlow.
"""
