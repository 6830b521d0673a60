// Step 4: load an AOTInductor .pt2 with torch::inductor::AOTIModelPackageLoader (and the shipped
// TorchScript file with torch::jit::load, as tch's CModule does), run both on random inputs of the
// server's shapes, 1 thread, alternating rounds; print median ms per call and max |diff|.
// usage: aoti_run <stage din|ranknet> <pkg.pt2> <model.pt> <B> <L> <C> [rounds] [calls] [inputs.pt]
// inputs.pt (dump_inputs.py): a TorchScript module whose attributes are real cascade inputs;
// B, L, C are then ignored.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

static double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

int main(int argc, char** argv) {
  if (argc < 7) { std::fprintf(stderr, "usage: %s stage pkg.pt2 model.pt B L C [rounds] [calls]\n", argv[0]); return 2; }
  std::string stage = argv[1];
  int64_t B = std::stoll(argv[4]), L = std::stoll(argv[5]), C = std::stoll(argv[6]);
  int rounds = argc > 7 ? std::stoi(argv[7]) : 15, calls = argc > 8 ? std::stoi(argv[8]) : 10;
  at::set_num_threads(1);
  c10::InferenceMode guard;
  auto t0 = std::chrono::steady_clock::now();
  torch::inductor::AOTIModelPackageLoader loader(argv[2]);
  auto t1 = std::chrono::steady_clock::now();
  auto ts = torch::jit::load(argv[3]);
  ts.eval();
  std::printf("loaded %s in %.1f ms (AOTI package), spec:", argv[2],
              std::chrono::duration<double, std::milli>(t1 - t0).count());
  for (auto& s : loader.get_call_spec()) std::printf(" [%s]", s.c_str());
  std::printf("\n");

  const int64_t N = 24915;
  torch::manual_seed(0);
  auto lens = torch::randint(1, L + 1, {B}, torch::kLong);
  lens[0] = L;  // padded to the longest
  auto mask = torch::arange(L).unsqueeze(0) < lens.unsqueeze(1);
  auto history = torch::randint(0, N, {B, L}, torch::kLong) * mask;
  auto cands = torch::randint(0, N, {B, C}, torch::kLong);
  auto s1 = std::get<0>(torch::rand({B, C}).sort(1, true));
  std::vector<at::Tensor> in{history, mask, cands, s1};
  if (stage == "ranknet") in.push_back(torch::randn({B, C}));
  if (argc > 9) {
    auto m = torch::jit::load(argv[9]);
    std::vector<std::string> names{"history", "mask", "cands", "s1", "s2"};
    in.clear();
    for (size_t i = 0; i < (stage == "ranknet" ? 5u : 4u); i++) in.push_back(m.attr(names[i]).toTensor());
    B = in[0].size(0); L = in[0].size(1); C = in[2].size(1);
  }
  std::vector<c10::IValue> iv(in.begin(), in.end());

  auto run_aoti = [&]() { return loader.run(in)[0]; };
  auto run_ts = [&]() { return ts.forward(iv).toTensor(); };
  auto a = run_aoti(), t = run_ts();
  std::printf("out %s, max|TS - AOTI| = %.3g\n", c10::str(a.sizes()).c_str(), (a - t).abs().max().item<float>());
  for (int i = 0; i < 5; i++) { run_aoti(); run_ts(); }
  std::vector<double> ta, tt;
  for (int r = 0; r < rounds; r++) {
    for (int k = 0; k < 2; k++) {
      bool aoti_now = (r + k) % 2 == 0;
      for (int c = 0; c < calls; c++) {
        auto s = std::chrono::steady_clock::now();
        if (aoti_now) run_aoti(); else run_ts();
        double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - s).count();
        (aoti_now ? ta : tt).push_back(ms);
      }
    }
  }
  double mt = median(tt), ma = median(ta);
  std::printf("%s B=%ld L=%ld C=%ld  TS %.3f ms  AOTI %.3f ms  AOTI/TS %.2f\n", stage.c_str(), B, L, C, mt, ma, ma / mt);
  return 0;
}
