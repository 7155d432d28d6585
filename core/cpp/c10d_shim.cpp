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

#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

namespace {

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> gloo;
};

void report(const std::exception& error, char* err, size_t err_len) {
  if (err == nullptr || err_len == 0) return;
  std::strncpy(err, error.what(), err_len - 1);
  err[err_len - 1] = '\0';
}

// PyTorch's convention: GLOO_SOCKET_IFNAME names the interface(s) to use, else the address the
// host name resolves to, else loopback.
std::shared_ptr<::gloo::transport::Device> device_from_environment() {
  const char* interfaces = std::getenv("GLOO_SOCKET_IFNAME");
  if (interfaces != nullptr && interfaces[0] != '\0') {
    std::string first(interfaces);
    first = first.substr(0, first.find(','));
    return c10d::ProcessGroupGloo::createDeviceForInterface(first);
  }
  return c10d::ProcessGroupGloo::createDefaultDevice();
}

int wait_for(const c10::intrusive_ptr<c10d::Work>& work, char* err, size_t err_len) {
  try {
    work->wait();
    return 0;
  } catch (const std::exception& error) {
    report(error, err, err_len);
    return -1;
  }
}

}  // namespace

extern "C" {

// Joins the group: rank 0 serves the store at master_addr:master_port, the others connect.
// Returns NULL with the reason in err on failure (a peer missing past timeout_ms included).
void* hicra_gloo_new(const char* master_addr, uint16_t master_port, int rank, int world_size, int64_t timeout_ms, char* err, size_t err_len) {
  try {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions options;
    options.port = master_port;
    options.isServer = rank == 0;
    options.numWorkers = static_cast<size_t>(world_size);
    options.waitWorkers = true;
    options.timeout = timeout;
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(master_addr), options);
    auto gloo_options = c10d::ProcessGroupGloo::Options::create(timeout);
    gloo_options->devices.push_back(device_from_environment());
    gloo_options->threads = 2;
    auto gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world_size, gloo_options);
    return new Group{store, gloo};
  } catch (const std::exception& error) {
    report(error, err, err_len);
    return nullptr;
  }
}

// Sums `tensor` over the group, in place. Returns 0, or -1 with the reason in err.
int hicra_gloo_all_reduce_sum(void* group, at::Tensor* tensor, char* err, size_t err_len) {
  try {
    std::vector<at::Tensor> tensors{*tensor};
    c10d::AllreduceOptions options;
    options.reduceOp = c10d::ReduceOp::SUM;
    auto work = static_cast<Group*>(group)->gloo->allreduce(tensors, options);
    return wait_for(work, err, err_len);
  } catch (const std::exception& error) {
    report(error, err, err_len);
    return -1;
  }
}

// Copies rank `root`'s `tensor` to every rank, in place.
int hicra_gloo_broadcast(void* group, at::Tensor* tensor, int root, char* err, size_t err_len) {
  try {
    std::vector<at::Tensor> tensors{*tensor};
    c10d::BroadcastOptions options;
    options.rootRank = root;
    auto work = static_cast<Group*>(group)->gloo->broadcast(tensors, options);
    return wait_for(work, err, err_len);
  } catch (const std::exception& error) {
    report(error, err, err_len);
    return -1;
  }
}

void hicra_gloo_free(void* group) {
  try {
    delete static_cast<Group*>(group);
  } catch (...) {
  }
}

}  // extern "C"
