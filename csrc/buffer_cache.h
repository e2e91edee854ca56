// A bounded cache of large host buffers for kernel outputs (the CTC loss's log_alpha and gradient).
//
// Why: a fresh multi-MiB allocation comes straight from mmap, and the kernel's first write to each of its
// 4 KiB pages takes a page fault plus a zeroing by the kernel: on a (T, N, C) gradient of 244 MiB that costs
// several times the arithmetic. glibc returns such blocks to the system on free, so a training loop pays it
// on every step. Here a freed output goes back to an idle list instead and the next request of about the same
// size gets it again, with its pages already mapped.
//
// Bounds: only requests of at least kMinBytes use it (glibc reuses smaller blocks by itself); the idle blocks
// together hold at most the limit (SEQFAST_CPU_BUFFER_CACHE_MB, default 1024; 0 turns the cache off), the
// oldest idle blocks are released first. Blocks in use are not counted: they are ordinary tensor storage
// (resizable, freed through the cache's deleter from any thread). All state is behind one mutex.
//
// Huge pages (opt-in, SEQFAST_CPU_HUGE_PAGES=1): on Linux, blocks of 2 MiB and more then start on a 2 MiB boundary
// and are marked MADV_HUGEPAGE (a hint, which the kernel takes where transparent huge pages are "madvise" or
// "always"), so that a row-by-row pass over a (T, N, C) gradient takes one TLB entry per 2 MiB instead of one per
// 4 KiB page: 6 % of a (1000, 32, 1000) forward+backward once the block is reused. Off by default because a new
// block's first touch cost several times more on huge pages than on small ones on a KVM guest (mostly 1.6-1.8
// against 0.2 ms per MiB; NOTES, "CTC outputs on huge pages"), which a training loop with changing shapes pays at
// each cache miss.
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <cstdint>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace seqfast {

struct BufferCacheStats {
  int64_t hits, misses, idle_bytes, limit_bytes;
};

class BufferCache final : public c10::Allocator {
 public:
  static constexpr size_t kMinBytes = size_t{1} << 20;
  static constexpr size_t kGranule = size_t{1} << 16;  // sizes rounded up, so that near sizes share blocks
  static constexpr size_t kHugeBytes = size_t{2} << 20;  // an x86-64 huge page

  static BufferCache& get() {
    // Never destroyed: tensors holding its blocks may be freed during static destruction.
    static BufferCache* cache = new BufferCache();
    return *cache;
  }

  // An uninitialised contiguous tensor, from the cache when it is large enough and the cache is on.
  at::Tensor empty(at::IntArrayRef sizes, at::ScalarType dtype) {
    int64_t numel = 1;
    for (int64_t s : sizes) numel *= s;
    const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
    if (bytes < kMinBytes || limit() == 0) return at::empty(sizes, at::TensorOptions().dtype(dtype));
    return at::detail::empty_generic(sizes, this, c10::DispatchKeySet(c10::DispatchKey::CPU), dtype, std::nullopt);
  }

  c10::DataPtr allocate(size_t n) override {
    const size_t bytes = (std::max<size_t>(n, 1) + kGranule - 1) / kGranule * kGranule;
    void* ptr = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      // Smallest idle block that fits without wasting more than a quarter of it.
      auto best = idle_.end();
      for (auto it = idle_.begin(); it != idle_.end(); ++it) {
        const bool fits = it->bytes >= bytes && it->bytes - bytes <= it->bytes / 4;
        if (fits && (best == idle_.end() || it->bytes < best->bytes)) {
          best = it;
        }
      }
      if (best != idle_.end()) {
        ptr = best->ptr;
        n = best->bytes;
        idle_bytes_ -= best->bytes;
        idle_.erase(best);
        ++hits_;
      } else {
        ++misses_;
      }
    }
    if (ptr == nullptr) {
      ptr = alloc_block(bytes);
      n = bytes;
    }
    report(ptr, static_cast<int64_t>(n));
    return {ptr, new Block{ptr, n}, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  BufferCacheStats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {hits_, misses_, static_cast<int64_t>(idle_bytes_), static_cast<int64_t>(limit_)};
  }

  // Sets the idle limit (0: off), releasing idle blocks above it; returns the previous limit.
  int64_t set_limit(int64_t bytes) {
    std::deque<Block> drop;
    int64_t old;
    {
      std::lock_guard<std::mutex> lock(mu_);
      old = static_cast<int64_t>(limit_);
      limit_ = static_cast<size_t>(std::max<int64_t>(bytes, 0));
      trim_locked(0, drop);
    }
    for (const Block& b : drop) c10::free_cpu(b.ptr);
    return old;
  }

 private:
  struct Block {
    void* ptr;
    size_t bytes;
  };

  BufferCache() {
    const char* env = std::getenv("SEQFAST_CPU_BUFFER_CACHE_MB");
    limit_ = (env != nullptr && *env != '\0' ? static_cast<size_t>(std::max(0LL, std::atoll(env))) : size_t{1024})
             << 20;
    const char* huge = std::getenv("SEQFAST_CPU_HUGE_PAGES");
    huge_pages_ = huge != nullptr && std::string(huge) == "1";
  }

  // A new block; freed by c10::free_cpu (free) either way.
  void* alloc_block(size_t bytes) const {
#if defined(__linux__)
    void* p = nullptr;
    if (huge_pages_ && bytes >= kHugeBytes && posix_memalign(&p, kHugeBytes, bytes) == 0) {
      madvise(p, bytes / kHugeBytes * kHugeBytes, MADV_HUGEPAGE);  // a hint: failure leaves 4 KiB pages
      return p;
    }
#endif
    return c10::alloc_cpu(bytes);
  }

  size_t limit() {
    std::lock_guard<std::mutex> lock(mu_);
    return limit_;
  }

  // Moves the oldest idle blocks to `drop` until `incoming` more bytes fit under the limit.
  void trim_locked(size_t incoming, std::deque<Block>& drop) {
    while (!idle_.empty() && idle_bytes_ + incoming > limit_) {
      idle_bytes_ -= idle_.front().bytes;
      drop.push_back(idle_.front());
      idle_.pop_front();
    }
  }

  // Blocks in use count as allocations for torch's memory profiler (as the default CPU allocator's do), so
  // profiles and the benchmarks' peak-memory column see them; idle blocks count as reserved only.
  void report(void* ptr, int64_t delta) {
    int64_t in_use, reserved;
    {
      std::lock_guard<std::mutex> lock(mu_);
      in_use_ += delta;
      in_use = in_use_;
      reserved = in_use_ + static_cast<int64_t>(idle_bytes_);
    }
    if (c10::memoryProfilingEnabled()) {
      c10::reportMemoryUsageToProfiler(ptr, delta, static_cast<size_t>(in_use), static_cast<size_t>(reserved),
                                       c10::Device(c10::DeviceType::CPU));
    }
  }

  static void release(void* ctx) {
    Block* block = static_cast<Block*>(ctx);
    get().report(block->ptr, -static_cast<int64_t>(block->bytes));
    get().give_back(*block);
    delete block;
  }

  void give_back(const Block& block) {
    std::deque<Block> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (block.bytes <= limit_) {
        trim_locked(block.bytes, drop);
        idle_.push_back(block);
        idle_bytes_ += block.bytes;
      } else {
        drop.push_back(block);
      }
    }
    for (const Block& b : drop) c10::free_cpu(b.ptr);  // outside the lock: munmap can take a while
  }

  std::mutex mu_;
  std::deque<Block> idle_;  // oldest first
  size_t idle_bytes_ = 0, limit_ = 0;
  bool huge_pages_ = false;  // SEQFAST_CPU_HUGE_PAGES=1
  int64_t in_use_ = 0;  // bytes of blocks handed out and not yet released
  int64_t hits_ = 0, misses_ = 0;
};

}  // namespace seqfast
