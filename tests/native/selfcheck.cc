// Runs the compiled kernels outside MindSpore, on any machine the library was built for (under qemu for
// another architecture): tests/test_kernel_portability.py writes the inputs and a manifest, this program loads
// the library as MindSpore's aot Custom op does (dlopen + the kernel's C signature), calls each kernel in turn
// and writes its outputs; the test compares them with a float64 numpy reference.
//
//   selfcheck LIBRARY MANIFEST
//
// MANIFEST lines: "threads N" (MindrlhfSetThreads), "call FUNCTION", then one line per parameter in order,
// "in|out NDIM DIM... FILE" (float32, raw little-endian), then "end". An input may be an earlier call's output.
// Prints "FUNCTION rc" per call; exits non-zero if a file or symbol is missing.
#include <dlfcn.h>

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

using Kernel = int (*)(int, void**, int*, int64_t**, const char**, void*, void*);

struct Param {
  bool input;
  std::vector<int64_t> shape;
  std::string file;
  std::vector<float> data;
};

static int64_t elements(const Param& p) {
  int64_t n = 1;
  for (int64_t d : p.shape) n *= d;
  return n;
}

static bool run(void* lib, const std::string& name, std::vector<Param>& params) {
  auto kernel = reinterpret_cast<Kernel>(dlsym(lib, name.c_str()));
  if (!kernel) {
    std::cerr << "no symbol " << name << "\n";
    return false;
  }
  std::vector<void*> pointers;
  std::vector<int> ndims;
  std::vector<int64_t*> shapes;
  std::vector<const char*> dtypes;
  for (auto& p : params) {
    p.data.assign(elements(p), 0.0f);
    if (p.input) {
      std::ifstream in(p.file, std::ios::binary);
      in.read(reinterpret_cast<char*>(p.data.data()), static_cast<std::streamsize>(p.data.size() * sizeof(float)));
      if (!in) {
        std::cerr << "cannot read " << p.file << "\n";
        return false;
      }
    }
    pointers.push_back(p.data.data());
    ndims.push_back(static_cast<int>(p.shape.size()));
    shapes.push_back(p.shape.data());
    dtypes.push_back("float32");
  }
  const int rc = kernel(static_cast<int>(params.size()), pointers.data(), ndims.data(), shapes.data(),
                        dtypes.data(), nullptr, nullptr);
  std::cout << name << " " << rc << std::endl;
  for (auto& p : params) {
    if (p.input) continue;
    std::ofstream out(p.file, std::ios::binary);
    out.write(reinterpret_cast<const char*>(p.data.data()), static_cast<std::streamsize>(p.data.size() * sizeof(float)));
    if (!out) {
      std::cerr << "cannot write " << p.file << "\n";
      return false;
    }
  }
  return true;
}

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: selfcheck LIBRARY MANIFEST\n";
    return 2;
  }
  void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    std::cerr << dlerror() << "\n";
    return 2;
  }
  std::ifstream manifest(argv[2]);
  std::string line, name;
  std::vector<Param> params;
  while (std::getline(manifest, line)) {
    std::istringstream words(line);
    std::string word;
    if (!(words >> word)) continue;
    if (word == "threads") {
      int n = 1;
      words >> n;
      reinterpret_cast<void (*)(int)>(dlsym(lib, "MindrlhfSetThreads"))(n);
    } else if (word == "call") {
      words >> name;
      params.clear();
    } else if (word == "in" || word == "out") {
      Param p{word == "in", {}, {}, {}};
      int ndim = 0;
      words >> ndim;
      p.shape.resize(ndim);
      for (auto& d : p.shape) words >> d;
      words >> p.file;
      params.push_back(p);
    } else if (word == "end") {
      if (!run(lib, name, params)) return 1;
    } else {
      std::cerr << "bad manifest line: " << line << "\n";
      return 2;
    }
  }
  return 0;
}
