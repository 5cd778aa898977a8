"""The lowest layer: which implementation of an op runs (``dispatch``), and the implementations
that are not plain torch: CPU/oneDNN GEMM helpers (``cpu``), the CPU training fast paths
(``cpu_block``, ``cpu_head``), the native inference paths (``cpu_eval``), native C++ kernels
(``native``), BatchNorm statistics shared with kernels/, numeric precision and the caching
allocator. Imports nothing above it."""
