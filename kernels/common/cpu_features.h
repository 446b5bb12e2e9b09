// What the host CPU can do, asked once at run time, so that the portable
// build (no -march) can still take the AVX and F16C paths where they exist.
#pragma once

namespace medakv {

bool CpuHasAvx();   // 256-bit float vectors (and the OS saves their registers)
bool CpuHasF16c();  // hardware fp16 <-> fp32 conversion (implies AVX)
bool CpuHasAvx2();  // 256-bit integer vectors (implies AVX)

}  // namespace medakv
