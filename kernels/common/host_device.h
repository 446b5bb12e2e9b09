// The one macro that marks arithmetic shared by the CPU backend and the CUDA kernels.
#pragma once

#if defined(__CUDACC__)
#define MEDAKV_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MEDAKV_HOST_DEVICE inline
#endif
