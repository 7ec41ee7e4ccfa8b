// The kernels with 16-lane AVX-512 vectors (compiled with -mavx512f -mavx512vl -mavx512bw
// -mavx512dq -mavx2 -mfma; run only where the CPU reports those features).
#define SHC_AVX512
#include "kernels.h"
