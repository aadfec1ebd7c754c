// CPU kernel of compact_paged_: compact_ inside a paged KV cache.
//
// The moves are compact_'s, planned in logical slot space (plan_slot_runs), then cut wherever
// the source or the destination crosses a block boundary, so that each piece lies in one
// physical block on both sides. In logical order a destination never exceeds its source, and
// the checked block table maps the slots a row uses one to one onto physical slots, so a
// forward walk over the pieces never reads a slot it already overwrote (memmove, since a
// piece's source and destination may overlap inside one block). One task per (tensor, b, h):
// tasks touch disjoint bytes (other heads, or blocks of another request).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../checks.h"
#include "../dyrate.h"
#include "slot_runs.h"

namespace dyrate {
namespace {

// Slots [dst, dst + len) of physical block dst_block take slots [src, src + len) of src_block.
struct Piece {
  int64_t dst_block, dst, src_block, src, len;
};

std::vector<std::vector<Piece>> plan_pieces(const at::Tensor& block_table,
                                            const at::Tensor& keep_index,
                                            const at::Tensor& new_length, int64_t block_size) {
  const auto runs = plan_slot_runs(keep_index, new_length);
  const bool wide = block_table.scalar_type() == at::kLong;
  const auto entry = [&](int64_t b, int64_t t) -> int64_t {
    const int64_t at = b * block_table.stride(0) + t * block_table.stride(1);
    return wide ? block_table.const_data_ptr<int64_t>()[at] : block_table.const_data_ptr<int>()[at];
  };
  std::vector<std::vector<Piece>> pieces(runs.size());
  for (size_t b = 0; b < runs.size(); ++b) {
    for (const SlotRun& r : runs[b]) {
      for (int64_t dst = r.dst, src = r.src, left = r.len; left > 0;) {
        const int64_t od = dst % block_size, os = src % block_size;
        const int64_t len = std::min({left, block_size - od, block_size - os});
        const auto row = static_cast<int64_t>(b);
        pieces[b].push_back(
            {entry(row, dst / block_size), od, entry(row, src / block_size), os, len});
        dst += len;
        src += len;
        left -= len;
      }
    }
  }
  return pieces;
}

// Where the bytes of one cache tensor are: strides in bytes by role.
struct Geometry {
  char* data;
  int64_t esize, D;
  int64_t blk, slot, head, chan;
};

// Element by element, slots in ascending order (a write never lands on a source still to be
// read, since the destination precedes the source), channels inside: no call per element.
template <typename T>
void move_elements(char* dst, const char* src, int64_t len, const Geometry& g) {
  const int64_t slot = g.slot / g.esize, chan = g.chan / g.esize;
  T* out = reinterpret_cast<T*>(dst);
  const T* in = reinterpret_cast<const T*>(src);
  for (int64_t u = 0; u < len; ++u) {
    for (int64_t d = 0; d < g.D; ++d) out[u * slot + d * chan] = in[u * slot + d * chan];
  }
}

struct alignas(16) Bytes16 {
  uint64_t lo, hi;
};

// Moves one piece of one head (head_base: the head's bytes in block 0, slot 0).
void move_piece(const Geometry& g, char* head_base, const Piece& p) {
  char* dst = head_base + p.dst_block * g.blk + p.dst * g.slot;
  const char* src = head_base + p.src_block * g.blk + p.src * g.slot;
  const int64_t row = g.D * g.esize;  // one slot's channels of one head
  if (g.chan == g.esize || g.D == 1) {
    if (g.slot == row) {  // rows back to back (HND): one copy
      std::memmove(dst, src, p.len * row);
    } else {  // NHD: a row per slot
      for (int64_t u = 0; u < p.len; ++u) std::memmove(dst + u * g.slot, src + u * g.slot, row);
    }
    return;
  }
  switch (g.esize) {  // strided channels (HDN): short runs, so no memmove per channel
    case 1:
      return move_elements<uint8_t>(dst, src, p.len, g);
    case 2:
      return move_elements<uint16_t>(dst, src, p.len, g);
    case 4:
      return move_elements<uint32_t>(dst, src, p.len, g);
    case 8:
      return move_elements<uint64_t>(dst, src, p.len, g);
    default:
      TORCH_CHECK(g.esize == 16, "compact_paged_: unsupported element size ", g.esize);
      return move_elements<Bytes16>(dst, src, p.len, g);
  }
}

}  // namespace

void compact_paged_cpu(at::TensorList caches, c10::ArrayRef<std::string> layouts,
                       const at::Tensor& block_table, const at::Tensor& keep_index,
                       const at::Tensor& new_length) {
  const PagedDims d =
      check_compact_paged_args(caches, layouts, block_table, keep_index, new_length);
  check_keep_index_values(keep_index, new_length);
  if (caches.empty()) return;
  check_block_table_values(block_table, keep_index, new_length, d.num_blocks, d.block_size);
  const auto pieces = plan_pieces(block_table, keep_index, new_length, d.block_size);

  std::vector<Geometry> geometry;
  std::vector<int64_t> heads;
  for (size_t t = 0; t < caches.size(); ++t) {
    const at::Tensor& x = caches[t];
    const PagedCache& c = d.caches[t];
    const int64_t es = x.element_size();
    geometry.push_back({x.numel() > 0 ? static_cast<char*>(x.data_ptr()) : nullptr, es, c.head_dim,
                        c.stride_blk * es, c.stride_slot * es, c.stride_h * es, c.stride_d * es});
    heads.push_back(x.numel() > 0 ? c.heads : 0);
  }
  parallel_rows(heads, keep_index.size(0), [&](size_t t, int64_t b, int64_t h) {
    const Geometry& g = geometry[t];
    char* head_base = g.data + h * g.head;
    for (const Piece& p : pieces[b]) move_piece(g, head_base, p);
  });
}

}  // namespace dyrate
