// A C interface to the collectives PyTorch's c10d ships inside libtorch_cpu.so: a TCPStore
// for the rendezvous and a ProcessGroupGloo for the collectives. tch does not bind them; this
// file is all the C++ hicra has. Every entry point catches C++ exceptions and reports them as
// text, so that nothing unwinds into Rust.
//
// Tensors cross as `at::Tensor*`, which is what tch's `Tensor::as_mut_ptr` holds.

#include <cstdlib>
#include <cstring>
#include <chrono>
#include <exception>
#include <string>

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

namespace {

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> gloo;
};

void report_text(const char* text, char* err, size_t err_len) {
  if (err == nullptr || err_len == 0) return;
  std::strncpy(err, text, err_len - 1);
  err[err_len - 1] = '\0';
}

// c10 errors carry a C++ backtrace in what(); the message alone is what a user needs.
void report(const std::exception& error, char* err, size_t err_len) {
  if (auto c10_error = dynamic_cast<const c10::Error*>(&error)) {
    report_text(c10_error->what_without_backtrace(), err, err_len);
  } else {
    report_text(error.what(), err, err_len);
  }
}

void report_unknown(char* err, size_t err_len) {
  report_text("an exception that is not a std::exception", err, err_len);
}

// PyTorch's convention: GLOO_SOCKET_IFNAME names the interfaces to use (comma-separated),
// else the address the host name resolves to, else loopback.
std::vector<std::shared_ptr<::gloo::transport::Device>> devices_from_environment() {
  std::vector<std::shared_ptr<::gloo::transport::Device>> devices;
  const char* interfaces = std::getenv("GLOO_SOCKET_IFNAME");
  if (interfaces != nullptr && interfaces[0] != '\0') {
    std::string list(interfaces);
    size_t start = 0;
    while (start <= list.size()) {
      size_t end = list.find(',', start);
      if (end == std::string::npos) end = list.size();
      if (end > start) devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(list.substr(start, end - start)));
      start = end + 1;
    }
  }
  if (devices.empty()) devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
  return devices;
}

// Runs `body`; an exception becomes -1 and its message in err, so none crosses into Rust.
template <typename Body>
int guarded(char* err, size_t err_len, Body&& body) {
  try {
    body();
    return 0;
  } catch (const std::exception& error) {
    report(error, err, err_len);
    return -1;
  } catch (...) {
    report_unknown(err, err_len);
    return -1;
  }
}

}  // namespace

extern "C" {

// Joins the group. With serve_store, rank 0 serves the rendezvous store at
// master_addr:master_port; otherwise (torchrun's agent already serves one there) every rank
// connects. Keys live under `prefix`, so a restarted attempt never reads an earlier one's.
// Returns NULL with the reason in err on failure (a peer missing past timeout_ms included).
void* hicra_gloo_new(const char* master_addr, uint16_t master_port, int rank, int world_size, int serve_store, const char* prefix, int64_t timeout_ms, char* err, size_t err_len) {
  Group* created = nullptr;
  guarded(err, err_len, [&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions options;
    options.port = master_port;
    options.isServer = serve_store != 0 && rank == 0;
    options.numWorkers = static_cast<size_t>(world_size);
    // Every rank counts itself in; the serving one also waits for all of them.
    options.waitWorkers = true;
    options.timeout = timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(master_addr), options);
    c10::intrusive_ptr<c10d::Store> store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp);
    auto gloo_options = c10d::ProcessGroupGloo::Options::create(timeout);
    gloo_options->devices = devices_from_environment();
    gloo_options->threads = 2;
    auto gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world_size, gloo_options);
    created = new Group{store, gloo};
  });
  return created;
}

// Sums `tensor` over the group, in place. Returns 0, or -1 with the reason in err.
int hicra_gloo_all_reduce_sum(void* group, at::Tensor* tensor, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    std::vector<at::Tensor> tensors{*tensor};
    c10d::AllreduceOptions options;
    options.reduceOp = c10d::ReduceOp::SUM;
    static_cast<Group*>(group)->gloo->allreduce(tensors, options)->wait();
  });
}

// Copies rank `root`'s `tensor` to every rank, in place.
int hicra_gloo_broadcast(void* group, at::Tensor* tensor, int root, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    std::vector<at::Tensor> tensors{*tensor};
    c10d::BroadcastOptions options;
    options.rootRank = root;
    static_cast<Group*>(group)->gloo->broadcast(tensors, options)->wait();
  });
}

// Sets `key` to `len` bytes in the group's rendezvous store.
int hicra_store_set(void* group, const char* key, const uint8_t* value, size_t len, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    std::vector<uint8_t> bytes(value, value + len);
    static_cast<Group*>(group)->store->set(std::string(key), bytes);
  });
}

// Reads `key` from the store, waiting for it up to the store's time-out. On success *value is
// a malloc'd buffer of *len bytes for the caller to release with hicra_buffer_free.
int hicra_store_get(void* group, const char* key, uint8_t** value, size_t* len, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    std::vector<uint8_t> bytes = static_cast<Group*>(group)->store->get(std::string(key));
    *len = bytes.size();
    *value = static_cast<uint8_t*>(std::malloc(bytes.size() > 0 ? bytes.size() : 1));
    if (*value == nullptr) throw std::bad_alloc();
    std::memcpy(*value, bytes.data(), bytes.size());
  });
}

void hicra_buffer_free(uint8_t* buffer) {
  std::free(buffer);
}

void hicra_gloo_free(void* group) {
  try {
    delete static_cast<Group*>(group);
  } catch (...) {
  }
}

}  // extern "C"
