// A read-only view of a whole file: memory-mapped, or read into memory when mapping is off.
#pragma once

#include <cstdint>
#include <string>

namespace dg {

class MappedFile {
public:
    MappedFile() = default;
    ~MappedFile();
    MappedFile(const MappedFile &) = delete;
    MappedFile & operator=(const MappedFile &) = delete;

    // Throws dg::Error (DG_ERR_IO) with a message naming the path.
    void open(const std::string & path, bool use_mmap);

    const uint8_t * data() const { return data_; }
    uint64_t        size() const { return size_; }
    // The process will not read [p, p + n) again soon (its bytes were copied elsewhere): with a
    // mapping, the whole pages inside it leave the process's resident set (the page cache may keep
    // them; reading them again faults them back in). Nothing happens without a mapping.
    void            release(const uint8_t * p, uint64_t n) const;

private:
    const uint8_t *      data_ = nullptr;
    uint64_t             size_ = 0;
    void *               map_ = nullptr;
    void *               buffer_ = nullptr;  // without a mapping: page-aligned, as a mapping would be
};

}  // namespace dg
