// The one pybind11 registration unit of moespec._C.
// Tensors cross this boundary as raw device addresses (Python ints) and the CUDA stream as an
// int handle, so the extension never links libtorch. All validation of shapes, dtypes and
// devices happens in python/moespec/ops.py before a launcher is called.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "moespec/api.h"
#include "cpu_kernels.h"
#ifdef MOESPEC_EMU_BUILD
#include "moespec_emu/selftest.h"
#endif

namespace py = pybind11;

#ifndef MOESPEC_CUDA_ARCHS_STR
#define MOESPEC_CUDA_ARCHS_STR ""
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "moespec native extension (torch-free CUDA kernels)";
#ifdef MOESPEC_WITH_CUDA
  m.attr("cuda_compiled") = true;
  m.attr("backend") = "cuda";
#elif defined(MOESPEC_EMU_BUILD)
  m.attr("cuda_compiled") = false;
  m.attr("backend") = "emu";  // the kernels run on the CPU emulator (csrc/emu), on CPU tensors
#else
  m.attr("cuda_compiled") = false;
  m.attr("backend") = "none";
#endif
#ifdef MOESPEC_HAVE_CUTLASS
  m.attr("cutlass") = true;
#else
  m.attr("cutlass") = false;
#endif
  m.attr("cuda_archs") = std::string(MOESPEC_CUDA_ARCHS_STR);

  m.def(
      "device_status",
      []() {
        py::dict d;
#ifdef MOESPEC_WITH_CUDA
        moespec::DeviceStatus s = moespec::query_devices();
        d["device_count"] = s.device_count;
        d["runtime_version"] = s.runtime_version;
        d["driver_version"] = s.driver_version;
        d["error"] = s.error;
#else
        d["device_count"] = 0;
        d["runtime_version"] = 0;
        d["driver_version"] = 0;
#ifdef MOESPEC_EMU_BUILD
        d["error"] = std::string("moespec was built for the CPU emulator (MOESPEC_CUDA=EMU), not for a GPU");
#else
        d["error"] = std::string("moespec was built without CUDA kernels (MOESPEC_CUDA=OFF or no nvcc)");
#endif
#endif
        return d;
      },
      "Number of usable CUDA devices, runtime/driver versions and the error (if any) that hides them.");

#ifdef MOESPEC_WITH_KERNELS
  // ---- kernels. Python (moespec/kernels.py) fills these argument structs with tensor
  // addresses; launchers return "" or a message, which becomes a RuntimeError here.
  py::class_<moespec::PlanArgs>(m, "PlanArgs")
      .def(py::init<>())
#define MOESPEC_RW(name) .def_readwrite(#name, &moespec::PlanArgs::name)
      MOESPEC_RW(logits) MOESPEC_RW(logits_dtype) MOESPEC_RW(logits_stride) MOESPEC_RW(in_ids)
      MOESPEC_RW(in_ids_type) MOESPEC_RW(in_weights) MOESPEC_RW(in_weights_dtype) MOESPEC_RW(in_kept)
      MOESPEC_RW(in_kept_type) MOESPEC_RW(n_in_kept) MOESPEC_RW(T) MOESPEC_RW(E) MOESPEC_RW(k)
      MOESPEC_RW(route) MOESPEC_RW(renormalize) MOESPEC_RW(score_mode) MOESPEC_RW(budget)
      MOESPEC_RW(coverage) MOESPEC_RW(min_budget) MOESPEC_RW(all_candidates) MOESPEC_RW(policy) MOESPEC_RW(csr_mode) MOESPEC_RW(ids)
      MOESPEC_RW(weights) MOESPEC_RW(row_max) MOESPEC_RW(row_sum) MOESPEC_RW(scores) MOESPEC_RW(meta)
      MOESPEC_RW(union_experts) MOESPEC_RW(kept_experts) MOESPEC_RW(act_experts) MOESPEC_RW(act_offsets)
      MOESPEC_RW(pair_token) MOESPEC_RW(pair_slot) MOESPEC_RW(pair_position) MOESPEC_RW(generation)
      MOESPEC_RW(contrib) MOESPEC_RW(sync) MOESPEC_RW(pf_base0) MOESPEC_RW(pf_base1) MOESPEC_RW(pf_stride0)
      MOESPEC_RW(pf_stride1) MOESPEC_RW(pf_bytes0) MOESPEC_RW(pf_bytes1) MOESPEC_RW(pf_experts);
#undef MOESPEC_RW
  py::class_<moespec::ExpertsArgs>(m, "ExpertsArgs")
      .def(py::init<>())
#define MOESPEC_RW(name) .def_readwrite(#name, &moespec::ExpertsArgs::name)
      MOESPEC_RW(dtype) MOESPEC_RW(transposed) MOESPEC_RW(x) MOESPEC_RW(x_stride) MOESPEC_RW(w_gu)
      MOESPEC_RW(w_down) MOESPEC_RW(b_gu) MOESPEC_RW(b_down) MOESPEC_RW(T) MOESPEC_RW(k) MOESPEC_RW(H)
      MOESPEC_RW(I) MOESPEC_RW(order) MOESPEC_RW(activation) MOESPEC_RW(alpha) MOESPEC_RW(limit)
      MOESPEC_RW(meta) MOESPEC_RW(act_experts) MOESPEC_RW(act_offsets) MOESPEC_RW(pair_token)
      MOESPEC_RW(pair_slot) MOESPEC_RW(pair_position) MOESPEC_RW(weights) MOESPEC_RW(hbuf) MOESPEC_RW(ybuf)
      MOESPEC_RW(out) MOESPEC_RW(atomic) MOESPEC_RW(max_experts) MOESPEC_RW(ksplit)
      MOESPEC_RW(ksplit1) MOESPEC_RW(gubuf) MOESPEC_RW(generation) MOESPEC_RW(counters) MOESPEC_RW(counters_len)
      MOESPEC_RW(grid) MOESPEC_RW(wait_ns);
#undef MOESPEC_RW
  m.attr("plan_max_experts") = moespec::plan_max_experts();
  m.attr("plan_max_topk") = moespec::plan_max_topk();
  m.attr("experts_v2_slice") = moespec::experts_v2_slice();
  m.def("experts_v2_grid", &moespec::experts_v2_grid,
        "The generation-2 persistent grid on the current device (SMs x resident CTAs per SM), or -1.");
  m.def("experts_v2_counters_len", &moespec::experts_v2_counters_len, py::arg("grid"),
        "Ints of the generation-2 counters buffer for a persistent grid of `grid` CTAs (-1 if grid < 1).");

  auto plan = [](const moespec::PlanArgs& a, int64_t stream) {
    std::string err = moespec::launch_routing_plan(a, stream);
    if (!err.empty()) throw std::runtime_error("moespec: " + err);
  };
  auto experts = [](const moespec::ExpertsArgs& a, int64_t stream) {
    std::string err = moespec::launch_moe_experts(a, stream);
    if (!err.empty()) throw std::runtime_error("moespec: " + err);
  };
  m.def("routing_plan", plan, py::arg("args"), py::arg("stream"),
        "Launch the routing plan (union, scores, kept set, re-routing, CSR): one CTA (generation 1) or "
        "token CTAs plus a last-CTA tail (generation 2).");
  m.def("moe_experts", experts, py::arg("args"), py::arg("stream"),
        "Launch GEMM1+SwiGLU, GEMM2+weights and the combine over a routing plan.");
  // moespec._cuda.has_kernel(op) looks for these op names; the three routing ops share the plan.
  m.attr("expert_union") = m.attr("routing_plan");
  m.attr("score_experts") = m.attr("routing_plan");
  m.attr("budget_routing") = m.attr("routing_plan");
#endif

  // ---- C++ CPU kernels (csrc/cpu), compiled in every build. Python (moespec/cpu_kernels.py)
  // fills these argument structs with CPU tensor addresses.
  py::class_<moespec::cpu::CpuPlanArgs>(m, "CpuPlanArgs")
      .def(py::init<>())
#define MOESPEC_RW(name) .def_readwrite(#name, &moespec::cpu::CpuPlanArgs::name)
      MOESPEC_RW(probs) MOESPEC_RW(probs_stride) MOESPEC_RW(in_ids)
      MOESPEC_RW(in_ids_type) MOESPEC_RW(in_weights) MOESPEC_RW(in_weights_dtype) MOESPEC_RW(in_kept)
      MOESPEC_RW(in_kept_type) MOESPEC_RW(n_in_kept) MOESPEC_RW(token_mask) MOESPEC_RW(T) MOESPEC_RW(E)
      MOESPEC_RW(k) MOESPEC_RW(route) MOESPEC_RW(renormalize) MOESPEC_RW(score_mode) MOESPEC_RW(budget)
      MOESPEC_RW(coverage) MOESPEC_RW(min_budget) MOESPEC_RW(policy) MOESPEC_RW(all_candidates)
      MOESPEC_RW(csr_mode) MOESPEC_RW(ids) MOESPEC_RW(weights) MOESPEC_RW(row_max) MOESPEC_RW(row_sum)
      MOESPEC_RW(scores) MOESPEC_RW(meta) MOESPEC_RW(union_experts) MOESPEC_RW(kept_experts)
      MOESPEC_RW(act_experts) MOESPEC_RW(act_offsets) MOESPEC_RW(pair_token) MOESPEC_RW(pair_slot)
      MOESPEC_RW(pair_position);
#undef MOESPEC_RW
  py::class_<moespec::cpu::CpuExpertsArgs>(m, "CpuExpertsArgs")
      .def(py::init<>())
#define MOESPEC_RW(name) .def_readwrite(#name, &moespec::cpu::CpuExpertsArgs::name)
      MOESPEC_RW(dtype) MOESPEC_RW(transposed) MOESPEC_RW(x) MOESPEC_RW(x_stride) MOESPEC_RW(w_gu)
      MOESPEC_RW(w_down) MOESPEC_RW(b_gu) MOESPEC_RW(b_down) MOESPEC_RW(T) MOESPEC_RW(k) MOESPEC_RW(H)
      MOESPEC_RW(I) MOESPEC_RW(order) MOESPEC_RW(activation) MOESPEC_RW(alpha) MOESPEC_RW(limit)
      MOESPEC_RW(meta) MOESPEC_RW(act_experts) MOESPEC_RW(act_offsets) MOESPEC_RW(pair_token)
      MOESPEC_RW(pair_slot) MOESPEC_RW(pair_position) MOESPEC_RW(weights) MOESPEC_RW(out) MOESPEC_RW(threads)
      MOESPEC_RW(min_thread_bytes);
#undef MOESPEC_RW
  m.def(
      "cpu_routing_plan",
      [](const moespec::cpu::CpuPlanArgs& a) {
        std::string err = moespec::cpu::routing_plan(a);
        if (!err.empty()) throw std::runtime_error("moespec: " + err);
      },
      py::arg("args"), "The routing plan on the CPU (union, scores, kept set, re-routing, CSR).");
  m.def(
      "cpu_moe_experts",
      [](const moespec::cpu::CpuExpertsArgs& a) {
        std::string err;
        {
          // The kernels touch no Python object: let other Python threads run meanwhile.
          py::gil_scoped_release nogil;
          err = moespec::cpu::moe_experts(a);
        }
        if (!err.empty()) throw std::runtime_error("moespec: " + err);
      },
      py::arg("args"), "GEMM1+SwiGLU, GEMM2+weights and the combine over a CPU routing plan.");
  m.def(
      "cpu_stream_read",
      [](uintptr_t p, int64_t bytes, int threads) {
        std::string err;
        double sum = 0;
        {
          py::gil_scoped_release nogil;
          err = moespec::cpu::stream_read(p, bytes, threads, &sum);
        }
        if (!err.empty()) throw std::runtime_error("moespec: " + err);
        return sum;
      },
      py::arg("ptr"), py::arg("bytes"), py::arg("threads"),
      "Read a buffer once with the CPU kernels' vector loads and thread pool; returns the sum of its fp32 words.");
  m.def(
      "cpu_isa",
      []() {
        std::string err;
        const int isa = moespec::cpu::active_isa(&err);
        if (isa < 0) throw std::invalid_argument("moespec: " + err);
        return std::string(moespec::cpu::isa_name(isa));
      },
      "The ISA level the CPU kernels use now (the detected level capped by MOESPEC_CPU_ISA).");
  m.def("cpu_isa_detected", []() { return std::string(moespec::cpu::isa_name(moespec::cpu::detected_isa())); },
        "The best ISA level this CPU and build support.");
  m.def("cpu_isas_compiled", &moespec::cpu::compiled_isas, "ISA levels compiled into this build, lowest first.");

#ifdef MOESPEC_EMU_BUILD
  // ---- the emulator's own controls and self-tests (tests/test_emu.py)
  m.def("emu_set_seed", &moespec_emu::set_seed, py::arg("seed"),
        "Seed the emulator's block and thread order (also MOESPEC_EMU_SEED).");
  m.def("emu_seed", &moespec_emu::seed);
  m.def("emu_take_prefetches", &moespec_emu::take_prefetches,
        "The L2 prefetch ranges (address, bytes) emulated kernels issued since the last call; clears them.");
  m.def("emu_set_sms", &moespec_emu::set_sm_count, py::arg("n"),
        "Set the emulated SM count (default 5): the device attribute and how many blocks are resident at once.");
  m.def("emu_sms", &moespec_emu::sm_count);
  m.def("emu_set_resident_limit", &moespec_emu::set_resident_limit, py::arg("n"),
        "At most n blocks of a launch resident at once (competing kernels hold the other SMs); 0: no limit.");
  m.def("emu_resident_limit", &moespec_emu::resident_limit);
  m.def("emu_set_image_arch", &moespec_emu::set_image_arch, py::arg("arch"),
        "The architecture the emulated kernel image was built for (default 90; below 90 griddep_wait is compiled out).");
  m.def("emu_image_arch", &moespec_emu::image_arch);
  m.def("emu_set_wait_timeout_rate", &moespec_emu::set_wait_timeout_rate, py::arg("rate"),
        "Probability that a bounded wait's unmet poll times out (default 0: only when no block can progress).");
  m.def("emu_take_wait_timeouts", &moespec_emu::take_wait_timeouts, "Bounded waits timed out since the last call.");
  m.def("emu_take_launches", &moespec_emu::take_launches,
        "The launches since the last call: (kernel name, launched as a programmatic dependent).");
  m.def("emu_set_perf", &moespec_emu::set_perf, py::arg("on"), py::arg("count_only") = false,
        "Trace launches for the performance model (count_only: skip cp.async copies and mma.sync).");
  m.def(
      "emu_take_perf",
      []() {
        py::list out;
        for (const moespec_emu::PerfLaunchPlain& l : moespec_emu::take_perf_plain()) {
          py::dict d;
          d["name"] = l.name;
          d["grid"] = py::make_tuple(l.grid[0], l.grid[1], l.grid[2]);
          d["threads"] = l.threads;
          d["smem"] = l.smem;
          d["pdl"] = l.pdl;
          d["blocks"] = l.blocks;
          out.append(d);
        }
        return out;
      },
      "The traced launches since the last call: name, grid, threads, smem, pdl and per block (index, cp.async "
      "bytes, explicit bytes, longest round-trip chain, thread 0's events (kind, a, b, cp.async bytes so far)).");
  m.def("emu_selftest_names", &moespec_emu::selftest_names);
  m.def(
      "emu_selftest",
      [](const std::string& name) {
        std::vector<int64_t> out;
        std::string err = moespec_emu::selftest(name, &out);
        return py::make_tuple(err, out);
      },
      py::arg("name"), "Run an emulator self-test scenario: (error message or '', reported values).");
  m.def(
      "emu_selftest_mma",
      [](bool bf16, uintptr_t a, uintptr_t b, uintptr_t c, uintptr_t d) {
        std::string err = moespec_emu::selftest_mma(bf16, reinterpret_cast<const uint16_t*>(a),
                                                    reinterpret_cast<const uint16_t*>(b),
                                                    reinterpret_cast<const float*>(c), reinterpret_cast<float*>(d));
        if (!err.empty()) throw std::runtime_error("moespec: " + err);
      },
      py::arg("bf16"), py::arg("a"), py::arg("b"), py::arg("c"), py::arg("d"),
      "One emulated warp-wide mma.m16n8k16 over addresses of a [16,16], b [16,8] (16-bit) and c, d [16,8] fp32.");
  m.def("emu_to_bf16", &moespec_emu::to_bf16);
  m.def("emu_to_half", &moespec_emu::to_half);
  m.def("emu_from_bf16", &moespec_emu::from_bf16);
  m.def("emu_from_half", &moespec_emu::from_half);
#endif
}
