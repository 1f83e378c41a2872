// Host emulation of one CUDA warp, for tests/test_matching.py: the CUDA kernel source of common.py runs on the CPU with
// its 32 lanes as ucontext fibers that switch round-robin at every *_sync call (lockstep shuffles, ballots and
// __syncwarp); a lane reaching a sync point that another lane skipped aborts with DIVERGENCE. It checks the kernel's
// logic (indexing, tie rule, duals, augmentation, output order, error slots), not timing or the host wrapper.
// Include this, then the kernel, then define EMULATION_MAIN and include it again for the launcher.
#ifndef EMULATION_MAIN
#include <ucontext.h>
#include <cstdint>
#include <cstring>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <algorithm>
struct Dim { unsigned x; };
static Dim threadIdx, blockIdx, blockDim{32};
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__
#define CUDART_INF (std::numeric_limits<double>::infinity())
double smem[64 * 64];  // one warp per emulated block
struct __half { uint16_t x; };
struct __nv_bfloat16 { uint16_t x; };
static float __bfloat162float(__nv_bfloat16 h) { uint32_t b = (uint32_t)h.x << 16; float f; memcpy(&f, &b, 4); return f; }
static float __half2float(__half h) {
  int s = h.x >> 15, e = (h.x >> 10) & 31, m = h.x & 1023; float v;
  if (e == 0) v = std::ldexp((float)m, -24); else if (e == 31) v = m ? NAN : INFINITY; else v = std::ldexp((float)(m + 1024), e - 25);
  return s ? -v : v;
}
static ucontext_t ctx[33];  // 32 lanes + main
static bool done[32];
static int cur_lane;
static uint64_t xch[32];
static void barrier() {
  int l = cur_lane, nxt = (l + 1) % 32;
  if (done[nxt]) { fprintf(stderr, "DIVERGENCE: lane %d at a sync point while lane %d returned\n", l, nxt); abort(); }
  cur_lane = nxt; swapcontext(&ctx[l], &ctx[nxt]);
  cur_lane = l; threadIdx.x = l;
}
template <class T> static T exch(T v, int src) {
  uint64_t bits = 0; memcpy(&bits, &v, sizeof v); xch[cur_lane] = bits; barrier();
  uint64_t got = xch[src & 31]; barrier(); T r; memcpy(&r, &got, sizeof r); return r;
}
template <class T> static T __shfl_sync(unsigned mask, T v, int src) { if (mask != 0xffffffffu) abort(); return exch(v, src); }
template <class T> static T __shfl_xor_sync(unsigned mask, T v, int o) { if (mask != 0xffffffffu) abort(); return exch(v, cur_lane ^ o); }
static unsigned __ballot_sync(unsigned, bool p) {
  xch[cur_lane] = p; barrier(); unsigned r = 0; for (int k = 0; k < 32; ++k) if (xch[k]) r |= 1u << k; barrier(); return r;
}
static bool __any_sync(unsigned m, bool p) { return __ballot_sync(m, p) != 0; }
static void __syncwarp() { barrier(); }
static int __popc(unsigned x) { return __builtin_popcount(x); }
static void atomicMin(unsigned long long* p, unsigned long long v) { if (v < *p) *p = v; }
#else
struct Args { const void* cost; int dtype; long long B; int N, M; long long sb, sr, sc; int maximize; long long* out;
              unsigned long long* err; };
static Args A;
static char stacks[32][1 << 16];

static void lane_main(int lane) {
  threadIdx.x = lane;
  cur_lane = lane;
  if ((A.N > A.M ? A.N : A.M) <= 32) lsap_warp<1>(A.cost, A.dtype, A.B, A.N, A.M, A.sb, A.sr, A.sc, A.maximize, A.out, A.err);
  else lsap_warp<2>(A.cost, A.dtype, A.B, A.N, A.M, A.sb, A.sr, A.sc, A.maximize, A.out, A.err);
  done[lane] = true;  // the next lane is parked at the last sync point: let it return too, then back to the launcher
  setcontext(lane == 31 ? &ctx[32] : &ctx[lane + 1]);
}

extern "C" void emu_run(const void* cost, int dtype, long long B, int N, int M, long long sb, long long sr,
                        long long sc, int maximize, long long* out, long long* bad) {
  unsigned long long err[2] = {~0ull, ~0ull};
  A = Args{cost, dtype, B, N, M, sb, sr, sc, maximize, out, err};
  for (long long k = 0; k < 2 * B * std::min(N, M); ++k) out[k] = -7;  // poison: unwritten outputs fail the checks
  for (long long b = 0; b < B; ++b) {
    blockIdx.x = (unsigned)b;
    for (int l = 0; l < 32; ++l) {
      done[l] = false;
      getcontext(&ctx[l]);
      ctx[l].uc_stack.ss_sp = stacks[l];
      ctx[l].uc_stack.ss_size = sizeof stacks[l];
      ctx[l].uc_link = nullptr;
      makecontext(&ctx[l], (void (*)())lane_main, 1, l);
    }
    swapcontext(&ctx[32], &ctx[0]);
    for (int l = 0; l < 32; ++l) if (!done[l]) { fprintf(stderr, "lane %d did not finish\n", l); abort(); }
  }
  bad[0] = (long long)err[0];
  bad[1] = (long long)err[1];
}
#endif
