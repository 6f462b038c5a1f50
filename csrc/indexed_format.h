// On-disk layout of the multimodal indexed dataset (prefix.idx + prefix.bin).
// The Python writer (qwenvl_megatron/data/indexed.py) writes exactly this; keep the two in step.
//
// prefix.idx (little endian):
//   IndexHeader (64 bytes)
//   uint64 sample_offsets[num_samples + 1]   byte offset of each sample in .bin; last = bin_size
//   uint64 image_start[num_samples + 1]      sample i owns images [image_start[i], image_start[i+1])
//   uint64 image_offsets[num_images]         byte offset of each encoded image in .bin
//   uint64 image_sizes[num_images]           its size in bytes
//   int32  lengths[num_samples]              token count of each sample
// prefix.bin:
//   BinHeader (16 bytes), then per sample: int32 tokens[L], int32 labels[L], image blobs back to back.
#pragma once
#include <cstddef>
#include <cstdint>

namespace qwenvl {

constexpr char kIndexMagic[8] = {'Q', 'V', 'L', 'I', 'D', 'X', '\0', '\1'};
constexpr char kBinMagic[8] = {'Q', 'V', 'L', 'B', 'I', 'N', '\0', '\1'};
constexpr uint32_t kFormatVersion = 1;

#pragma pack(push, 1)
struct IndexHeader {
  char magic[8];
  uint32_t version;
  uint32_t header_crc;  // crc32 of these 64 bytes with header_crc = 0
  uint64_t num_samples;
  uint64_t num_images;
  uint64_t num_tokens;
  uint64_t bin_size;    // exact size of prefix.bin, header included
  uint32_t index_crc;   // crc32 of everything in .idx after the header
  uint32_t data_crc;    // crc32 of everything in .bin after its header
  uint64_t reserved;
};
struct BinHeader {
  char magic[8];
  uint64_t reserved;
};
#pragma pack(pop)
static_assert(sizeof(IndexHeader) == 64, "IndexHeader must be 64 bytes");
static_assert(sizeof(BinHeader) == 16, "BinHeader must be 16 bytes");

// zlib-compatible CRC-32 (same value as Python's zlib.crc32).
uint32_t crc32_update(uint32_t crc, const uint8_t* data, size_t n);

}  // namespace qwenvl
