// fxpress::lowrank_linear and fxpress::lowrank_ffn on the CPU: a chain of Linear steps run a tile
// of rows at a time, so the FFN's wide hidden layer exists only as one tile per thread. Each step
// is a panel product (fxpress/native/panel_gemm.h) with its epilogue.
//
// Threads: with a tile per thread or more, each thread takes whole tiles and runs the chain on
// its own scratch, with no barriers. With fewer rows (decoding), all threads run each step of a
// tile together, split by panels.

#include <omp.h>

namespace {

using namespace fxpress_gemm;

constexpr int64_t TILE_MAX = 96;     // rows per tile, at most
constexpr int64_t TILE_BYTES = 2 << 20;  // the widest step output's tile, at most
// Rows per thread from which threads take tiles of their own; below, they share each tile's panels
// (every thread reading every weight would double the bytes read when the weights dominate).
constexpr int64_t ROW_SPLIT_MIN = 24;
constexpr int OUT = -1;

struct Chain {
  const float* x;
  int64_t x_stride, m;
  float* out;
  int64_t out_stride;
  std::vector<Step> steps;
  std::vector<int64_t> widths;  // of the scratch buffers 1..

  // The most rows a tile may have: its widest step output stays within TILE_BYTES.
  int64_t max_tile_rows() const {
    int64_t widest = 1;
    for (int64_t w : widths) widest = std::max(widest, w);
    const int64_t rows = TILE_BYTES / (4 * widest) / MR * MR;
    return std::max<int64_t>(MR, std::min(rows, TILE_MAX));
  }

  // Runs one tile [r0, r0 + rows); panels of every step split over the team when `split`.
  void run_tile(int64_t r0, int64_t rows, std::vector<float>& scratch, int64_t tile, bool split) const {
    for (const Step& s : steps) {
      const float* a = s.src == 0 ? x + r0 * x_stride : scratch.data() + offset(s.src, tile);
      const int64_t lda = s.src == 0 ? x_stride : widths[s.src - 1];
      float* c = s.dst == OUT ? out + r0 * out_stride : scratch.data() + offset(s.dst, tile);
      const int64_t ldc = s.dst == OUT ? out_stride : widths[s.dst - 1];
      const int64_t panels = (s.n + NR - 1) / NR;
      if (split) {  // this thread's share of the panels, then wait for the step's output
        const int64_t team = omp_get_num_threads(), me = omp_get_thread_num();
        run_step(s, a, lda, rows, c, ldc, panels * me / team, panels * (me + 1) / team);
#pragma omp barrier
      } else {
        run_step(s, a, lda, rows, c, ldc, 0, panels);
      }
    }
  }

  int64_t offset(int buffer, int64_t tile) const {
    int64_t at = 0;
    for (int b = 1; b < buffer; ++b) at += tile * widths[b - 1];
    return at;
  }

  void run(int threads) const {
    const int64_t most = max_tile_rows();
    if (m >= threads * ROW_SPLIT_MIN) {  // tiles per thread: as many tiles to each, of even size
      int64_t tiles = std::max<int64_t>(threads, (m + most - 1) / most);
      tiles = (tiles + threads - 1) / threads * threads;
      const int64_t tile = std::min(most, ((m + tiles - 1) / tiles + MR - 1) / MR * MR);
      tiles = (m + tile - 1) / tile;
#pragma omp parallel num_threads(threads)
      {
        std::vector<float> scratch(scratch_size(tile));
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < tiles; ++t) run_tile(t * tile, std::min(tile, m - t * tile), scratch, tile, false);
      }
    } else {  // every thread on every tile, each with its share of the panels
      std::vector<float> scratch(scratch_size(most));
#pragma omp parallel num_threads(threads)
      for (int64_t r0 = 0; r0 < m; r0 += most) run_tile(r0, std::min(most, m - r0), scratch, most, true);
    }
  }

  int64_t scratch_size(int64_t tile) const {
    int64_t size = 0;
    for (int64_t w : widths) size += tile * w;
    return size;
  }
};

}  // namespace

extern "C" {

// out[m, n] = (x[m, in] . down^T) . up^T + bias; down and up as panels (ranks and widths unpadded).
void fxpress_lowrank_linear(const float* x, int64_t x_stride, int64_t m, int64_t in_features,
                            const float* down, int64_t rank, const float* up, int64_t n, const float* bias,
                            float* out, int64_t out_stride, int threads) {
  Chain chain{x, x_stride, m, out, out_stride, {}, {rank}};
  chain.steps = {{down, nullptr, in_features, rank, NONE, WRITE, 0, 1},
                 {up, bias, rank, n, NONE, WRITE, 1, OUT}};
  chain.run(threads);
}

// out = L2(act(L1(x))) or, with a gate, L2(act(Lg(x)) * L1(x)); each L is a factor pair as above.
void fxpress_lowrank_ffn(const float* x, int64_t x_stride, int64_t m, int64_t in_features,
                         const float* down1, int64_t rank1, const float* up1, int64_t hidden, const float* bias1,
                         const float* down2, int64_t rank2, const float* up2, int64_t n, const float* bias2,
                         const float* gate_down, int64_t gate_rank, const float* gate_up, const float* gate_bias,
                         int activation, float* out, int64_t out_stride, int threads) {
  Chain chain{x, x_stride, m, out, out_stride, {}, {rank1, hidden, rank2}};
  chain.steps.push_back({down1, nullptr, in_features, rank1, NONE, WRITE, 0, 1});
  if (gate_down) {
    chain.widths.push_back(gate_rank);
    chain.steps.push_back({gate_down, nullptr, in_features, gate_rank, NONE, WRITE, 0, 4});
    chain.steps.push_back({up1, bias1, rank1, hidden, NONE, WRITE, 1, 2});
    chain.steps.push_back({gate_up, gate_bias, gate_rank, hidden, activation, MULTIPLY, 4, 2});
  } else {
    chain.steps.push_back({up1, bias1, rank1, hidden, activation, WRITE, 1, 2});
  }
  chain.steps.push_back({down2, nullptr, hidden, rank2, NONE, WRITE, 2, 3});
  chain.steps.push_back({up2, bias2, rank2, n, NONE, WRITE, 3, OUT});
  chain.run(threads);
}

}  // extern "C"
