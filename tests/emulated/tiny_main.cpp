// Runs tiny_kernel.cuh's block_reverse through the CPU executor on n floats (n from argv[1],
// 3 blocks: the grid-stride loop wraps), read from stdin as raw float32, and writes the output
// to stdout the same way. Built and run by tests/test_sanitizers.py.
#include <cstdio>
#include <cstdlib>
#include <memory>

#include "tiny_kernel.cuh"

int main(int argc, char** argv) {
  const long n = argc > 1 ? std::atol(argv[1]) : 0;
  std::unique_ptr<float[]> in(new float[n]), out(new float[n]);
  if (std::fread(in.get(), sizeof(float), n, stdin) != static_cast<size_t>(n)) {
    std::fprintf(stderr, "expected %ld floats on stdin\n", n);
    return 2;
  }
  try {
    tiny::launch_block_reverse(in.get(), n, out.get(), 3);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "launch failed: %s\n", e.what());
    return 3;
  }
  std::fwrite(out.get(), sizeof(float), n, stdout);
  return 0;
}
