#include "mapped_file.h"

#include "error.h"

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace dg {

namespace {

struct FdCloser {
    int fd;
    ~FdCloser() {
        if (fd >= 0) {
            ::close(fd);
        }
    }
};

}  // namespace

MappedFile::~MappedFile() {
    if (map_ != nullptr) {
        ::munmap(map_, static_cast<size_t>(size_));
    }
    std::free(buffer_);
}

void MappedFile::open(const std::string & path, bool use_mmap) {
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) {
        const int err = errno;
        fail(DG_ERR_IO, format("cannot open '%s': %s", path.c_str(), std::strerror(err)));
    }
    if (S_ISDIR(st.st_mode)) {
        fail(DG_ERR_IO, format("cannot open '%s': is a directory, expected a .gguf file", path.c_str()));
    }
    if (!S_ISREG(st.st_mode)) {
        fail(DG_ERR_IO, format("cannot open '%s': not a regular file", path.c_str()));
    }
    FdCloser fd{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
    if (fd.fd < 0) {
        const int err = errno;
        fail(DG_ERR_IO, format("cannot open '%s': %s", path.c_str(), std::strerror(err)));
    }
    size_ = static_cast<uint64_t>(st.st_size);
    if (size_ == 0) {
        data_ = nullptr;
        return;
    }
    if (use_mmap) {
        void * map = ::mmap(nullptr, static_cast<size_t>(size_), PROT_READ, MAP_SHARED, fd.fd, 0);
        if (map == MAP_FAILED) {
            const int err = errno;
            fail(DG_ERR_IO, format("cannot map '%s': %s", path.c_str(), std::strerror(err)));
        }
        map_  = map;
        data_ = static_cast<const uint8_t *>(map);
        return;
    }
    // Aligned like a mapping, so the data section is as aligned as the file's (ggml refuses host
    // buffers that are not).
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    if (::posix_memalign(&buffer_, page, static_cast<size_t>(size_)) != 0) {
        buffer_ = nullptr;
        fail(DG_ERR_OUT_OF_MEMORY, format("cannot read '%s' into memory: %llu bytes", path.c_str(),
                                          static_cast<unsigned long long>(size_)));
    }
    uint8_t * bytes = static_cast<uint8_t *>(buffer_);
    uint64_t  done  = 0;
    while (done < size_) {
        const ssize_t n = ::read(fd.fd, bytes + done, static_cast<size_t>(size_ - done));
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            const int err = n < 0 ? errno : EIO;
            fail(DG_ERR_IO, format("cannot read '%s': %s", path.c_str(), std::strerror(err)));
        }
        done += static_cast<uint64_t>(n);
    }
    data_ = bytes;
}

void MappedFile::release(const uint8_t * p, uint64_t n) const {
    if (map_ == nullptr || p < data_ || p + n > data_ + size_) {
        return;
    }
    const uintptr_t page  = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
    const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + page - 1) / page * page;
    const uintptr_t end   = (reinterpret_cast<uintptr_t>(p) + n) / page * page;
    if (end > begin) {
        ::madvise(reinterpret_cast<void *>(begin), end - begin, MADV_DONTNEED);  // advice: a failure changes nothing
    }
}

}  // namespace dg
