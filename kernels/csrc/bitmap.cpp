// Canonical bitmap format <-> dense. Runs at pack time and (until the compute kernels take the packed form directly)
// at load time, so it is threaded over rows; it needs no ISA beyond the baseline.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace sparamx {
namespace {

template <typename scalar_t>
void pack_rows(const scalar_t* w, int64_t rows, int64_t cols, uint8_t* bitmask, int64_t* counts) {
  const int64_t nbytes = (cols + 7) / 8;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = w + r * cols;
      uint8_t* bits = bitmask + r * nbytes;
      int64_t count = 0;
      for (int64_t c = 0; c < cols; ++c) {
        // `!= 0` on the value, not the bytes: -0.0 is a zero, as in compressed-tensors.
        if (row[c] != scalar_t(0)) {
          bits[c >> 3] |= static_cast<uint8_t>(1u << (c & 7));
          ++count;
        }
      }
      counts[r] = count;
    }
  });
}

template <typename scalar_t>
void gather_rows(const scalar_t* w, int64_t rows, int64_t cols, const int64_t* offsets, scalar_t* values) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = w + r * cols;
      scalar_t* out = values + offsets[r];
      for (int64_t c = 0; c < cols; ++c) {
        if (row[c] != scalar_t(0)) *out++ = row[c];
      }
    }
  });
}

// Copies element by element through an integer type of the element's width: unpack never needs the value's meaning.
template <typename word_t>
void scatter_rows(const word_t* values, const uint8_t* bitmask, const int64_t* offsets, int64_t rows, int64_t cols,
                  word_t* out) {
  const int64_t nbytes = (cols + 7) / 8;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint8_t* bits = bitmask + r * nbytes;
      const word_t* src = values + offsets[r];
      word_t* dst = out + r * cols;
      for (int64_t k = 0; k < nbytes; ++k) {
        unsigned byte = bits[k];
        while (byte) {
          const int b = __builtin_ctz(byte);
          dst[8 * k + b] = *src++;
          byte &= byte - 1;
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> bitmap_pack(const at::Tensor& dense) {
  TORCH_CHECK(dense.device().is_cpu(), "bitmap_pack: expected a CPU tensor, got ", dense.device());
  TORCH_CHECK(dense.dim() == 2, "bitmap_pack: expected a 2-D weight [out, in], got shape ", dense.sizes());
  const at::Tensor w = dense.contiguous();
  const int64_t rows = w.size(0), cols = w.size(1);
  at::Tensor bitmask = at::zeros({rows, (cols + 7) / 8}, w.options().dtype(at::kByte));
  at::Tensor counts = at::empty({rows}, w.options().dtype(at::kLong));
  at::Tensor compressed;
  AT_DISPATCH_ALL_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "bitmap_pack", [&] {
    pack_rows<scalar_t>(w.const_data_ptr<scalar_t>(), rows, cols, bitmask.data_ptr<uint8_t>(),
                        counts.data_ptr<int64_t>());
  });
  at::Tensor row_offsets = counts.cumsum(0) - counts;  // exclusive prefix sum
  const int64_t nnz = rows == 0 ? 0 : counts.sum().item<int64_t>();
  compressed = at::empty({nnz}, w.options());
  AT_DISPATCH_ALL_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "bitmap_pack", [&] {
    gather_rows<scalar_t>(w.const_data_ptr<scalar_t>(), rows, cols, row_offsets.const_data_ptr<int64_t>(),
                          compressed.data_ptr<scalar_t>());
  });
  return {compressed, bitmask, row_offsets};
}

void bitmap_check(const at::Tensor& compressed, const at::Tensor& bitmask, const at::Tensor& row_offsets,
                  int64_t in_features) {
  TORCH_CHECK(compressed.device().is_cpu() && bitmask.device().is_cpu() && row_offsets.device().is_cpu(),
              "bitmap: expected CPU tensors");
  TORCH_CHECK(in_features >= 0, "bitmap: in_features must be >= 0, got ", in_features);
  TORCH_CHECK(compressed.dim() == 1, "bitmap: compressed must be 1-D, got shape ", compressed.sizes());
  TORCH_CHECK(bitmask.scalar_type() == at::kByte, "bitmap: bitmask must be uint8, got ", bitmask.scalar_type());
  const int64_t nbytes = (in_features + 7) / 8;
  TORCH_CHECK(bitmask.dim() == 2 && bitmask.size(1) == nbytes, "bitmap: bitmask must be [rows, ", nbytes,
              "] for in_features=", in_features, ", got shape ", bitmask.sizes());
  const int64_t rows = bitmask.size(0);
  TORCH_CHECK(row_offsets.scalar_type() == at::kLong, "bitmap: row_offsets must be int64, got ",
              row_offsets.scalar_type());
  TORCH_CHECK(row_offsets.dim() == 1 && row_offsets.size(0) == rows, "bitmap: row_offsets must be [", rows,
              "], got shape ", row_offsets.sizes());
  const size_t elem = compressed.element_size();
  TORCH_CHECK(elem == 1 || elem == 2 || elem == 4 || elem == 8, "bitmap: unsupported dtype ",
              compressed.scalar_type());

  const at::Tensor bits = bitmask.contiguous();
  const at::Tensor offsets = row_offsets.contiguous();
  const uint8_t* bp = bits.const_data_ptr<uint8_t>();
  const int64_t* op = offsets.const_data_ptr<int64_t>();
  // The bitmask is the truth; row_offsets and the number of values must agree with it, and no bit may lie past
  // in_features. Checked before anything reads values, so a corrupt artifact is an error, never an out-of-bounds read.
  std::vector<int64_t> popcounts(rows);
  const uint8_t tail_mask = (in_features % 8) ? static_cast<uint8_t>(0xFF << (in_features % 8)) : 0;
  std::vector<int64_t> bad_tail(rows, 0);
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint8_t* row = bp + r * nbytes;
      int64_t count = 0;
      for (int64_t k = 0; k < nbytes; ++k) count += __builtin_popcount(row[k]);
      popcounts[r] = count;
      bad_tail[r] = (nbytes > 0 && (row[nbytes - 1] & tail_mask)) ? 1 : 0;
    }
  });
  int64_t expected = 0;
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(!bad_tail[r], "bitmap: bitmask row ", r, " has bits set past in_features=", in_features);
    TORCH_CHECK(op[r] == expected, "bitmap: row_offsets[", r, "] is ", op[r],
                " but the bitmask popcount of the rows before it is ", expected);
    expected += popcounts[r];
  }
  TORCH_CHECK(compressed.numel() == expected, "bitmap: the bitmask has ", expected,
              " set bits but compressed holds ", compressed.numel(), " values");
}

at::Tensor bitmap_unpack(const at::Tensor& compressed, const at::Tensor& bitmask, const at::Tensor& row_offsets,
                         int64_t in_features) {
  bitmap_check(compressed, bitmask, row_offsets, in_features);
  const at::Tensor values = compressed.contiguous();
  const at::Tensor bits = bitmask.contiguous();
  const at::Tensor offsets = row_offsets.contiguous();
  const uint8_t* bp = bits.const_data_ptr<uint8_t>();
  const int64_t* op = offsets.const_data_ptr<int64_t>();
  const int64_t rows = bitmask.size(0);
  const size_t elem = values.element_size();

  at::Tensor out = at::zeros({rows, in_features}, values.options());
  if (rows == 0 || in_features == 0) return out;
  switch (elem) {
    case 1: scatter_rows<uint8_t>(static_cast<const uint8_t*>(values.const_data_ptr()), bp, op, rows, in_features,
                                  static_cast<uint8_t*>(out.data_ptr())); break;
    case 2: scatter_rows<uint16_t>(static_cast<const uint16_t*>(values.const_data_ptr()), bp, op, rows, in_features,
                                   static_cast<uint16_t*>(out.data_ptr())); break;
    case 4: scatter_rows<uint32_t>(static_cast<const uint32_t*>(values.const_data_ptr()), bp, op, rows, in_features,
                                   static_cast<uint32_t*>(out.data_ptr())); break;
    default: scatter_rows<uint64_t>(static_cast<const uint64_t*>(values.const_data_ptr()), bp, op, rows,
                                    in_features, static_cast<uint64_t*>(out.data_ptr()));
  }
  return out;
}

TORCH_LIBRARY_IMPL(sparamx, CPU, m) {
  m.impl("bitmap_pack", &bitmap_pack);
  m.impl("bitmap_unpack", &bitmap_unpack);
  m.impl("bitmap_check", &bitmap_check);
}

}  // namespace sparamx
