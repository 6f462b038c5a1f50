// Memory-mapped reader of the multimodal indexed dataset. Validation happens at open so a truncated or
// corrupt file fails there, with the file named, rather than as garbage samples mid-training.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cerrno>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "indexed_format.h"

namespace py = pybind11;

namespace qwenvl {

uint32_t crc32_update(uint32_t crc, const uint8_t* data, size_t n) {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  crc = ~crc;
  for (size_t i = 0; i < n; ++i) crc = table[(crc ^ data[i]) & 0xFF] ^ (crc >> 8);
  return ~crc;
}

namespace {

class MappedFile {
 public:
  explicit MappedFile(const std::string& path) : path_(path) {
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) throw std::runtime_error(path + ": cannot open (" + std::strerror(errno) + ")");
    struct stat st{};
    if (::fstat(fd_, &st) != 0) {
      ::close(fd_);
      throw std::runtime_error(path + ": cannot stat (" + std::strerror(errno) + ")");
    }
    size_ = static_cast<size_t>(st.st_size);
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd_, 0);
      if (p == MAP_FAILED) {
        ::close(fd_);
        throw std::runtime_error(path + ": mmap failed (" + std::strerror(errno) + ")");
      }
      data_ = static_cast<const uint8_t*>(p);
    }
  }
  ~MappedFile() {
    if (data_) ::munmap(const_cast<uint8_t*>(data_), size_);
    if (fd_ >= 0) ::close(fd_);
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  int fd_ = -1;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

struct ImageCopy {
  const uint8_t* src;
  char* dst;
  size_t n;
};

}  // namespace

class IndexedReader {
 public:
  explicit IndexedReader(const std::string& prefix)
      : prefix_(prefix), idx_(prefix + ".idx"), bin_(prefix + ".bin") {
    const std::string& ip = idx_.path();
    const std::string& bp = bin_.path();
    if (idx_.size() < sizeof(IndexHeader))
      throw std::runtime_error(ip + ": truncated index (" + std::to_string(idx_.size()) +
                               " bytes, header alone is 64)");
    std::memcpy(&h_, idx_.data(), sizeof(IndexHeader));
    if (std::memcmp(h_.magic, kIndexMagic, 8) != 0)
      throw std::runtime_error(ip + ": not a qwenvl indexed dataset index (bad magic)");
    if (h_.version != kFormatVersion)
      throw std::runtime_error(ip + ": unsupported format version " + std::to_string(h_.version));
    IndexHeader zeroed = h_;
    zeroed.header_crc = 0;
    if (crc32_update(0, reinterpret_cast<const uint8_t*>(&zeroed), sizeof zeroed) != h_.header_crc)
      throw std::runtime_error(ip + ": header checksum mismatch (corrupt index header)");
    const uint64_t n = h_.num_samples, m = h_.num_images;
    const uint64_t expected = sizeof(IndexHeader) + 16 * (n + 1) + 16 * m + 4 * n;
    if (idx_.size() != expected)
      throw std::runtime_error(ip + ": size " + std::to_string(idx_.size()) + " != expected " +
                               std::to_string(expected) + " (truncated or corrupt index)");
    if (bin_.size() != h_.bin_size)
      throw std::runtime_error(bp + ": size " + std::to_string(bin_.size()) + " != " +
                               std::to_string(h_.bin_size) +
                               " recorded in the index (truncated or wrong data file)");
    if (bin_.size() < sizeof(BinHeader) || std::memcmp(bin_.data(), kBinMagic, 8) != 0)
      throw std::runtime_error(bp + ": not a qwenvl indexed dataset data file (bad magic)");

    const uint8_t* p = idx_.data() + sizeof(IndexHeader);
    sample_offsets_ = reinterpret_cast<const uint64_t*>(p);
    p += 8 * (n + 1);
    image_start_ = reinterpret_cast<const uint64_t*>(p);
    p += 8 * (n + 1);
    image_offsets_ = reinterpret_cast<const uint64_t*>(p);
    p += 8 * m;
    image_sizes_ = reinterpret_cast<const uint64_t*>(p);
    p += 8 * m;
    lengths_ = reinterpret_cast<const int32_t*>(p);
    // Cheap end-point checks; verify() walks the whole file.
    if (sample_offsets_[0] != sizeof(BinHeader) || sample_offsets_[n] != h_.bin_size ||
        image_start_[0] != 0 || image_start_[n] != m)
      throw std::runtime_error(ip + ": inconsistent offsets (corrupt index)");
  }

  size_t size() const { return static_cast<size_t>(h_.num_samples); }
  const IndexHeader& header() const { return h_; }
  const std::string& prefix() const { return prefix_; }
  const int32_t* lengths() const { return lengths_; }
  const uint64_t* image_start() const { return image_start_; }

  // Full structural and checksum check: every sample's extent and both CRCs.
  void verify() const {
    const uint64_t n = h_.num_samples;
    const std::string& ip = idx_.path();
    for (uint64_t i = 0; i < n; ++i) {
      const uint64_t L = static_cast<uint64_t>(lengths_[i]);
      uint64_t end = sample_offsets_[i] + 8 * L;
      if (lengths_[i] < 0 || image_start_[i] > image_start_[i + 1])
        throw std::runtime_error(ip + ": corrupt entry for sample " + std::to_string(i));
      for (uint64_t j = image_start_[i]; j < image_start_[i + 1]; ++j) {
        if (image_offsets_[j] != end)
          throw std::runtime_error(ip + ": corrupt image offset in sample " + std::to_string(i));
        end += image_sizes_[j];
      }
      if (end != sample_offsets_[i + 1])
        throw std::runtime_error(ip + ": sample " + std::to_string(i) + " extent mismatch");
    }
    const uint32_t icrc = crc32_update(0, idx_.data() + sizeof(IndexHeader), idx_.size() - sizeof(IndexHeader));
    if (icrc != h_.index_crc) throw std::runtime_error(ip + ": index checksum mismatch");
    const uint32_t dcrc = crc32_update(0, bin_.data() + sizeof(BinHeader), bin_.size() - sizeof(BinHeader));
    if (dcrc != h_.data_crc) throw std::runtime_error(bin_.path() + ": data checksum mismatch");
  }

  py::tuple get(int64_t i) const {
    py::list out = gather(std::vector<int64_t>{i});
    return out[0].cast<py::tuple>();
  }

  // Allocate the Python objects with the GIL, then fill them (page faults and memcpy) without it.
  py::list gather(const std::vector<int64_t>& indices) const {
    const int64_t n = static_cast<int64_t>(h_.num_samples);
    std::vector<uint64_t> idx(indices.size());
    for (size_t k = 0; k < indices.size(); ++k) {
      int64_t i = indices[k];
      if (i < 0) i += n;
      if (i < 0 || i >= n)
        throw py::index_error(prefix_ + ": sample index " + std::to_string(indices[k]) +
                              " out of range for " + std::to_string(n) + " samples");
      idx[k] = static_cast<uint64_t>(i);
    }
    std::vector<py::array_t<int32_t>> tokens, labels;
    std::vector<int32_t*> tok_dst, lab_dst;
    std::vector<py::list> images;
    std::vector<ImageCopy> copies;
    tokens.reserve(idx.size());
    labels.reserve(idx.size());
    for (uint64_t i : idx) {
      const py::ssize_t L = lengths_[i];
      tokens.emplace_back(L);
      labels.emplace_back(L);
      tok_dst.push_back(tokens.back().mutable_data());
      lab_dst.push_back(labels.back().mutable_data());
      py::list imgs;
      for (uint64_t j = image_start_[i]; j < image_start_[i + 1]; ++j) {
        const size_t sz = static_cast<size_t>(image_sizes_[j]);
        PyObject* b = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(sz));
        if (!b) throw py::error_already_set();
        copies.push_back({bin_.data() + image_offsets_[j], PyBytes_AS_STRING(b), sz});
        imgs.append(py::reinterpret_steal<py::object>(b));
      }
      images.push_back(std::move(imgs));
    }
    {
      py::gil_scoped_release release;
      for (size_t k = 0; k < idx.size(); ++k) {
        const uint64_t i = idx[k];
        const size_t L = static_cast<size_t>(lengths_[i]);
        const uint8_t* src = bin_.data() + sample_offsets_[i];
        std::memcpy(tok_dst[k], src, 4 * L);
        std::memcpy(lab_dst[k], src + 4 * L, 4 * L);
      }
      for (const ImageCopy& c : copies) std::memcpy(c.dst, c.src, c.n);
    }
    py::list out;
    for (size_t k = 0; k < idx.size(); ++k) out.append(py::make_tuple(tokens[k], labels[k], images[k]));
    return out;
  }

 private:
  std::string prefix_;
  MappedFile idx_;
  MappedFile bin_;
  IndexHeader h_{};
  const uint64_t* sample_offsets_ = nullptr;
  const uint64_t* image_start_ = nullptr;
  const uint64_t* image_offsets_ = nullptr;
  const uint64_t* image_sizes_ = nullptr;
  const int32_t* lengths_ = nullptr;
};

// A read-only numpy view into the mapping; the reader object stays alive as the array's base.
template <typename T>
static py::array readonly_view(py::object owner, const T* ptr, size_t n) {
  py::array_t<T> arr({static_cast<py::ssize_t>(n)}, {static_cast<py::ssize_t>(sizeof(T))}, ptr, owner);
  arr.attr("setflags")(py::arg("write") = false);
  return std::move(arr);
}

void register_indexed_reader(py::module_& m) {
  m.def("crc32", [](py::buffer b, uint32_t crc) {
    py::buffer_info info = b.request();
    const auto* p = static_cast<const uint8_t*>(info.ptr);
    const size_t n = static_cast<size_t>(info.size * info.itemsize);
    py::gil_scoped_release release;
    return crc32_update(crc, p, n);
  }, py::arg("data"), py::arg("crc") = 0, "zlib-compatible CRC-32 (used by tests to cross-check the format).");

  py::class_<IndexedReader>(m, "IndexedReader", "Memory-mapped reader of prefix.idx/prefix.bin.")
      .def(py::init<const std::string&>(), py::arg("prefix"))
      .def("__len__", &IndexedReader::size)
      .def("get", &IndexedReader::get, py::arg("index"),
           "(tokens int32[L], labels int32[L], list[bytes] encoded images) of one sample.")
      .def("gather", &IndexedReader::gather, py::arg("indices"),
           "Like get for many indices; the copies run with the GIL released.")
      .def("verify", &IndexedReader::verify, py::call_guard<py::gil_scoped_release>(),
           "Check every sample extent and both CRC-32 checksums (reads the whole dataset).")
      .def_property_readonly("lengths", [](py::object self) {
        const auto& r = self.cast<const IndexedReader&>();
        return readonly_view<int32_t>(self, r.lengths(), r.size());
      })
      .def_property_readonly("image_counts", [](const IndexedReader& r) {
        py::array_t<int64_t> out(static_cast<py::ssize_t>(r.size()));
        int64_t* o = out.mutable_data();
        const uint64_t* s = r.image_start();
        for (size_t i = 0; i < r.size(); ++i) o[i] = static_cast<int64_t>(s[i + 1] - s[i]);
        return out;
      })
      .def_property_readonly("num_images", [](const IndexedReader& r) { return r.header().num_images; })
      .def_property_readonly("num_tokens", [](const IndexedReader& r) { return r.header().num_tokens; })
      .def_property_readonly("prefix", &IndexedReader::prefix);
}

}  // namespace qwenvl
