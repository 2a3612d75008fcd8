// Error propagation inside the core: internal code throws dg::Error; the C ABI layer (api.cpp)
// catches it, stores the message for dg_last_error() and returns the status.
#pragma once

#include "dgemma.h"

#include <stdexcept>
#include <string>

namespace dg {

class Error : public std::runtime_error {
public:
    Error(dg_status status, const std::string & message) : std::runtime_error(message), status_(status) {}
    dg_status status() const { return status_; }

private:
    dg_status status_;
};

// printf-style formatting into a std::string.
std::string format(const char * fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 1, 2)))
#endif
    ;

[[noreturn]] void fail(dg_status status, const std::string & message);

// Thread-local "last error" behind dg_last_error().
void        set_last_error(const std::string & message);
const char * last_error();

}  // namespace dg
