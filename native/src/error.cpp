#include "error.h"

#include <cstdarg>
#include <cstdio>
#include <vector>

namespace dg {

namespace {
thread_local std::string g_last_error;
}

std::string format(const char * fmt, ...) {
    va_list args;
    va_start(args, fmt);
    va_list copy;
    va_copy(copy, args);
    const int n = std::vsnprintf(nullptr, 0, fmt, copy);
    va_end(copy);
    std::string out;
    if (n > 0) {
        std::vector<char> buf(static_cast<size_t>(n) + 1);
        std::vsnprintf(buf.data(), buf.size(), fmt, args);
        out.assign(buf.data(), static_cast<size_t>(n));
    }
    va_end(args);
    return out;
}

void fail(dg_status status, const std::string & message) { throw Error(status, message); }

void set_last_error(const std::string & message) { g_last_error = message; }

const char * last_error() { return g_last_error.c_str(); }

}  // namespace dg
