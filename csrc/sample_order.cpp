// The global sample order as a pure function of (seed, k), computed on the fly.
//
// Blending: dataset i's j-th draw is placed at "time" (2j+1) * P_i with period P_i ~ 2^40 / w_i
// (Sainte-Lague / Webster apportionment). The global sequence is all draws sorted by (time, dataset id),
// so after k draws every dataset has round(w_i * k) +- 1 of them, and the k-th draw is found by a binary
// search on time: count_i(T) = (T / P_i + 1) / 2. Nothing of size O(samples) is ever stored.
//
// Epochs: draw j of dataset i of size n is epoch j / n, position j % n; the sample id is a keyed Feistel
// permutation of [0, n) (cycle walking on the next even power of two), keyed by (seed, dataset, epoch).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <queue>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace qwenvl {
namespace {

using u128 = unsigned __int128;

inline uint64_t mix64(uint64_t x) {  // splitmix64 finaliser: a strong 64-bit bijective hash
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

constexpr int kRounds = 6;

// Keyed bijection on [0, n).
class FeistelPermutation {
 public:
  FeistelPermutation(uint64_t n, uint64_t key) : n_(n) {
    int bits = 2;
    while (bits < 64 && (uint64_t{1} << bits) < n) ++bits;
    if (bits & 1) ++bits;
    half_ = bits / 2;
    mask_ = (uint64_t{1} << half_) - 1;
    for (int r = 0; r < kRounds; ++r) keys_[r] = mix64(key ^ mix64(static_cast<uint64_t>(r) + 1));
  }
  uint64_t operator()(uint64_t x) const {
    do x = encrypt(x); while (x >= n_);  // cycle walking keeps the result inside [0, n)
    return x;
  }

 private:
  uint64_t encrypt(uint64_t x) const {
    uint64_t left = x >> half_, right = x & mask_;
    for (int r = 0; r < kRounds; ++r) {
      const uint64_t next = left ^ (mix64(right ^ keys_[r]) & mask_);
      left = right;
      right = next;
    }
    return (left << half_) | right;
  }
  uint64_t n_;
  int half_;
  uint64_t mask_;
  uint64_t keys_[kRounds];
};

}  // namespace

class SampleOrder {
 public:
  SampleOrder(std::vector<uint64_t> sizes, std::vector<double> weights, uint64_t seed, bool shuffle)
      : sizes_(std::move(sizes)), seed_(seed), shuffle_(shuffle) {
    if (sizes_.empty()) throw std::invalid_argument("SampleOrder: no datasets given");
    if (weights.empty()) weights.assign(sizes_.size(), 1.0);
    if (weights.size() != sizes_.size())
      throw std::invalid_argument("SampleOrder: " + std::to_string(weights.size()) + " weights for " +
                                  std::to_string(sizes_.size()) + " datasets");
    long double total = 0;
    for (size_t i = 0; i < sizes_.size(); ++i) {
      if (sizes_[i] == 0) throw std::invalid_argument("SampleOrder: dataset " + std::to_string(i) + " is empty");
      if (!(weights[i] > 0) || !std::isfinite(weights[i]))
        throw std::invalid_argument("SampleOrder: weight of dataset " + std::to_string(i) + " must be > 0");
      total += weights[i];
    }
    for (double w : weights) {
      const long double p = std::ldexp(1.0L, 40) * total / w;
      if (p > std::ldexp(1.0L, 80)) throw std::invalid_argument("SampleOrder: weight ratio beyond 2^40");
      periods_.push_back(static_cast<u128>(p + 0.5L));
    }
    min_period_ = periods_[0];
    for (u128 p : periods_) min_period_ = p < min_period_ ? p : min_period_;
  }

  size_t num_datasets() const { return sizes_.size(); }

  // Sample id of draw j of dataset d.
  uint64_t sample_of_draw(size_t d, uint64_t j) const {
    const uint64_t n = sizes_[d];
    const uint64_t epoch = j / n, pos = j % n;
    if (!shuffle_) return pos;
    return FeistelPermutation(n, epoch_key(d, epoch))(pos);
  }

  uint64_t epoch_key(size_t d, uint64_t epoch) const {
    return mix64(seed_ ^ mix64(0xD1B54A32D192ED03ULL * (d + 1) ^ mix64(epoch)));
  }

  std::pair<int64_t, int64_t> lookup(uint64_t k) const {
    auto [d, j] = draw_of(k);
    return {static_cast<int64_t>(d), static_cast<int64_t>(sample_of_draw(d, j))};
  }

  // Fill draws k = start .. start+count-1; cheap per element after one search.
  void lookup_range(uint64_t start, uint64_t count, int32_t* dataset_ids, int64_t* sample_ids) const {
    if (count == 0) return;
    const size_t D = sizes_.size();
    std::vector<uint64_t> next(D, 0);  // draws of each dataset that come before position `start`
    if (D == 1) {
      next[0] = start;
    } else if (start > 0) {
      auto [d, j] = draw_of(start - 1);
      const u128 T = (2 * static_cast<u128>(j) + 1) * periods_[d];
      for (size_t i = 0; i < D; ++i) {
        next[i] = count_le(i, T - 1);
        if (i <= d && T % periods_[i] == 0 && ((T / periods_[i]) & 1)) ++next[i];
      }
    }
    using Item = std::pair<u128, size_t>;  // (time of next draw, dataset): smallest first
    std::priority_queue<Item, std::vector<Item>, std::greater<Item>> heap;
    for (size_t i = 0; i < D; ++i) heap.push({(2 * static_cast<u128>(next[i]) + 1) * periods_[i], i});
    size_t cached_d = SIZE_MAX;
    uint64_t cached_epoch = 0;
    FeistelPermutation perm(1, 0);
    for (uint64_t k = 0; k < count; ++k) {
      const size_t d = heap.top().second;
      heap.pop();
      const uint64_t j = next[d]++;
      heap.push({(2 * static_cast<u128>(next[d]) + 1) * periods_[d], d});
      const uint64_t n = sizes_[d], epoch = j / n, pos = j % n;
      dataset_ids[k] = static_cast<int32_t>(d);
      if (!shuffle_) {
        sample_ids[k] = static_cast<int64_t>(pos);
        continue;
      }
      if (d != cached_d || epoch != cached_epoch) {
        perm = FeistelPermutation(n, epoch_key(d, epoch));
        cached_d = d;
        cached_epoch = epoch;
      }
      sample_ids[k] = static_cast<int64_t>(perm(pos));
    }
  }

  // Number of draws of each dataset among the first k global draws.
  std::vector<uint64_t> draws_before(uint64_t k) const {
    std::vector<uint64_t> out(sizes_.size(), 0);
    if (sizes_.size() == 1) {
      out[0] = k;
      return out;
    }
    if (k == 0) return out;
    auto [d, j] = draw_of(k - 1);
    const u128 T = (2 * static_cast<u128>(j) + 1) * periods_[d];
    for (size_t i = 0; i < sizes_.size(); ++i) {
      out[i] = count_le(i, T - 1);
      if (i <= d && T % periods_[i] == 0 && ((T / periods_[i]) & 1)) ++out[i];
    }
    return out;
  }

 private:
  uint64_t count_le(size_t i, u128 T) const { return static_cast<uint64_t>((T / periods_[i] + 1) / 2); }
  u128 count_all(u128 T) const {
    u128 c = 0;
    for (size_t i = 0; i < sizes_.size(); ++i) c += count_le(i, T);
    return c;
  }

  // (dataset, draw number within it) of global draw k.
  std::pair<size_t, uint64_t> draw_of(uint64_t k) const {
    if (sizes_.size() == 1) return {0, k};
    u128 lo = 0, hi = (2 * static_cast<u128>(k) + 1) * min_period_;  // count_all(hi) >= k + 1
    while (lo < hi) {
      const u128 mid = lo + (hi - lo) / 2;
      if (count_all(mid) >= static_cast<u128>(k) + 1) hi = mid; else lo = mid + 1;
    }
    const u128 T = lo;
    uint64_t rank = k - static_cast<uint64_t>(count_all(T - 1));  // among the draws tied at time T
    for (size_t i = 0; i < sizes_.size(); ++i) {
      if (T % periods_[i] != 0 || !((T / periods_[i]) & 1)) continue;
      if (rank == 0) return {i, static_cast<uint64_t>((T / periods_[i] - 1) / 2)};
      --rank;
    }
    throw std::logic_error("SampleOrder: blending search failed");
  }

  std::vector<uint64_t> sizes_;
  std::vector<u128> periods_;
  u128 min_period_ = 0;
  uint64_t seed_;
  bool shuffle_;
};

void register_sample_order(py::module_& m) {
  py::class_<SampleOrder>(m, "SampleOrder", "Seeded, blended, epoch-shuffled global sample order.")
      .def(py::init<std::vector<uint64_t>, std::vector<double>, uint64_t, bool>(), py::arg("sizes"),
           py::arg("weights"), py::arg("seed"), py::arg("shuffle") = true)
      .def_property_readonly("num_datasets", &SampleOrder::num_datasets)
      .def("lookup", [](const SampleOrder& o, int64_t k) {
        if (k < 0) throw py::index_error("SampleOrder.lookup: negative sample number " + std::to_string(k));
        return o.lookup(static_cast<uint64_t>(k));
      }, py::arg("k"))
      .def("lookup_range", [](const SampleOrder& o, int64_t start, int64_t count) {
        if (start < 0 || count < 0)
          throw py::index_error("SampleOrder.lookup_range: start and count must be >= 0");
        py::array_t<int32_t> ds(count);
        py::array_t<int64_t> ids(count);
        int32_t* dp = ds.mutable_data();
        int64_t* ip = ids.mutable_data();
        {
          py::gil_scoped_release release;
          o.lookup_range(static_cast<uint64_t>(start), static_cast<uint64_t>(count), dp, ip);
        }
        return py::make_tuple(ds, ids);
      }, py::arg("start"), py::arg("count"))
      .def("sample_of_draw", &SampleOrder::sample_of_draw, py::arg("dataset"), py::arg("draw"),
           "Sample id of the draw-th sample taken from one dataset (epoch = draw // size).")
      .def("draws_before", &SampleOrder::draws_before, py::arg("k"),
           "How many of the first k global samples came from each dataset.");
}

}  // namespace qwenvl
