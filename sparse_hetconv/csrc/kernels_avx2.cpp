// The kernels with 8-lane AVX2 vectors (compiled with -mavx2 -mfma; run only where the CPU reports
// AVX2 and FMA).
#define SHC_AVX2
#include "kernels.h"
