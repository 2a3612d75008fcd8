// Runs work(0) .. work(n_workers - 1) on n_workers threads (the caller's thread is worker 0).
#pragma once

#include <thread>
#include <vector>

namespace dg {

template <typename Work>
void run_workers(unsigned n_workers, Work && work) {
    std::vector<std::thread> pool;
    for (unsigned w = 1; w < n_workers; ++w) {
        pool.emplace_back(work, w);
    }
    work(0u);
    for (auto & th : pool) {
        th.join();
    }
}

}  // namespace dg
