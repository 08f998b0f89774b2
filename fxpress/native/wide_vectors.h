// On AVX-512 cores GCC still picks 256-bit vectors by default (prefer-vector-width=256). The loops
// pasted after this line are arithmetic the compiler vectorises itself; full-width vectors measured
// faster for them on a 2-core Xeon (Sapphire Rapids). Without AVX-512 this changes nothing.
#if defined(__GNUC__) && !defined(__clang__) && defined(__AVX512F__)
#pragma GCC target("prefer-vector-width=512")
#endif
