"""flexio's benchmarks and model synthesis, imported as flexio_bench (this folder is bench/).

They import the runtime (flexio, flexio_kernels); the runtime never imports them. The
`flexio` command finds their subcommands (synth, bench-io, bench-peer, bench-sweep) through
the entry points this package declares in pyproject.toml. Results land in bench/results/.

  synth.py    preset shapes + quant type -> a random-weight GGUF (benchmark models, test models)
  disk.py     bench-io: io_uring O_DIRECT vs pread vs buffered vs mmap (in a cgroup) vs fio
  peer.py     bench-peer: flexio vs llama.cpp, prefill and decode tok/s on one file
  sweep.py    bench-sweep: decode tok/s vs memory budget per mode, with the bound; PNG
  point.py    one sweep point in a fresh process (the engine's API + CPU steal)
  cgroup.py   cgroup v1 memory limits and dropping the page cache (root)
  kernels.py  a script: kernel GB/s vs a plain memory-read loop
"""
