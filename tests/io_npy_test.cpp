// NumPy files: .npy round trips and refusals, .npz archives as NumPy writes them (tests/data/npz, written by
// NumPy: stored, deflated, ZIP64, data descriptors), the writer's archives, and corrupt archives.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "diffuse/common.h"
#include "diffuse/io/file.h"
#include "diffuse/io/npy.h"
#include "test_util.h"

namespace {

using diffuse_test::error_of;

const std::string kNpzDir = std::string(DIFFUSE_TEST_DATA) + "/npz/";

at::Tensor parse_npy(const std::string& bytes) {
  return diffuse::npy_parse(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), "t.npy");
}

diffuse::NpzArchive parse_npz(const std::string& bytes, uint64_t max_member = uint64_t(1) << 32) {
  return diffuse::npz_parse(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), "t.npz",
                            max_member);
}

// A .npy image with this header dict and these data bytes.
std::string npy_with(const std::string& dict, const std::string& data) {
  std::string header = dict;
  header.append((64 - (10 + header.size() + 1) % 64) % 64, ' ');
  header.push_back('\n');
  std::string b = "\x93NUMPY\x01";
  b.push_back('\0');
  b.push_back(static_cast<char>(header.size() & 0xff));
  b.push_back(static_cast<char>(header.size() >> 8));
  return b + header + data;
}

void put_u16(std::string& s, size_t at, uint32_t v) {
  s[at] = static_cast<char>(v & 0xff);
  s[at + 1] = static_cast<char>((v >> 8) & 0xff);
}
void put_u32(std::string& s, size_t at, uint32_t v) {
  put_u16(s, at, v & 0xffff);
  put_u16(s, at + 2, v >> 16);
}
uint32_t get_u16(const std::string& s, size_t at) {
  return static_cast<uint8_t>(s[at]) | (static_cast<uint32_t>(static_cast<uint8_t>(s[at + 1])) << 8);
}

TEST(Npy, EveryDtypeRoundTrips) {
  for (at::ScalarType dtype : {at::kBool, at::kByte, at::kChar, at::kShort, at::kInt, at::kLong, at::kHalf,
                               at::kFloat, at::kDouble}) {
    for (const std::vector<int64_t>& shape : std::vector<std::vector<int64_t>>{{}, {3}, {2, 3, 4}, {0, 5}}) {
      const int64_t n = std::max<int64_t>(1, c10::multiply_integers(shape));
      at::Tensor t = at::arange(n, at::kDouble).sub(n / 2).mul(dtype == at::kBool ? 0.0 : 1.5);
      if (dtype == at::kBool) t = at::arange(n).remainder(2);
      t = t.narrow(0, 0, c10::multiply_integers(shape)).reshape(shape).to(dtype);
      const std::string bytes = diffuse::npy_serialize(t);
      const size_t header = 10 + get_u16(bytes, 8);
      EXPECT_EQ(header % 64, 0u) << c10::toString(dtype);
      EXPECT_EQ(bytes.size(), header + t.numel() * t.element_size());
      at::Tensor back = parse_npy(bytes);
      EXPECT_EQ(back.scalar_type(), dtype);
      EXPECT_EQ(back.sizes(), t.sizes());
      EXPECT_TRUE(at::equal(back, t)) << c10::toString(dtype);
    }
  }
  // Python's tuples, as NumPy writes them.
  EXPECT_NE(diffuse::npy_header(at::kFloat, {3}).find("'shape': (3,)"), std::string::npos);
  EXPECT_NE(diffuse::npy_header(at::kDouble, {}).find("'descr': '<f8', 'fortran_order': False, 'shape': ()"),
            std::string::npos);
  EXPECT_NE(diffuse::npy_header(at::kByte, {2, 3}).find("'descr': '|u1'"), std::string::npos);
  // The numbers NumPy's own header and data would hold for float32 [1, 2] = {1.0, -2.0}.
  const float values[] = {1.0f, -2.0f};
  at::Tensor parsed = parse_npy(npy_with("{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2), }",
                                         std::string(reinterpret_cast<const char*>(values), sizeof(values))));
  EXPECT_EQ(parsed[0][1].item<float>(), -2.0f);
}

TEST(Npy, RefusesWhatItCannotRead) {
  const std::string eight(8, '\0');
  auto dict = [](const std::string& descr, const std::string& shape, const std::string& order = "False") {
    return "{'descr': " + descr + ", 'fortran_order': " + order + ", 'shape': " + shape + ", }";
  };
  EXPECT_NE(error_of([&] { parse_npy(npy_with(dict("'>f8'", "(1,)"), eight)); }).find("big-endian"),
            std::string::npos);
  EXPECT_NE(error_of([&] { parse_npy(npy_with(dict("'<U2'", "(1,)"), eight)); }).find("not supported"),
            std::string::npos);
  EXPECT_NE(error_of([&] { parse_npy(npy_with(dict("'|O'", "(1,)"), eight)); }).find("not supported"),
            std::string::npos);
  EXPECT_NE(error_of([&] { parse_npy(npy_with(dict("[('a', '<f8')]", "(1,)"), eight)); }).find("structured"),
            std::string::npos);
  EXPECT_NE(error_of([&] { parse_npy(npy_with(dict("'<f8'", "(1,)", "True"), eight)); }).find("Fortran"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              parse_npy(npy_with(dict("'<f8'", "(2,)"), eight));
            }).find("data holds 8 bytes, shape needs 16"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              parse_npy(npy_with(dict("'|b1'", "(2,)"), std::string("\x01\x02", 2)));
            }).find("0 or 1"),
            std::string::npos);
  std::string dims = "(";
  for (int i = 0; i < 17; ++i) dims += "1, ";
  dims += ")";
  EXPECT_NE(error_of([&] { parse_npy(npy_with(dict("'|u1'", dims), "x")); }).find("more than 16"),
            std::string::npos);
  EXPECT_NE(error_of([&] { parse_npy("\x93NUMPX\x01\x00\x00\x00"); }).find("bad magic"), std::string::npos);
  EXPECT_NE(error_of([&] {
              parse_npy(npy_with("{'descr': '<f8', 'shape': (1,), }", eight));
            }).find("fortran_order"),
            std::string::npos);
}

TEST(Npz, ReadsWhatNumpyWrites) {
  const diffuse::NpzArchive f =
      diffuse::npz_load(kNpzDir + "features.npz");  // np.savez: stored, ZIP64 local headers
  ASSERT_EQ(f.members.size(), 3u);
  at::Tensor a = diffuse::npz_array(f, "a"), b = diffuse::npz_array(f, "b"), fd = diffuse::npz_array(f, "fd");
  EXPECT_EQ(a.scalar_type(), at::kFloat);
  EXPECT_EQ(a.sizes(), (std::vector<int64_t>{40, 8}));
  EXPECT_EQ(b.sizes(), (std::vector<int64_t>{30, 8}));
  EXPECT_EQ(fd.scalar_type(), at::kDouble);
  EXPECT_EQ(fd.dim(), 0);
  // pytorch-fid's layout: savez_compressed (deflate); the same arrays with ZIP64 records; and streamed with
  // data descriptors. All three hold mu float32 [8] and sigma float64 [8, 8] of the set a.
  const diffuse::NpzArchive ref = diffuse::npz_load(kNpzDir + "pytorch_fid_a.npz");
  at::Tensor mu = diffuse::npz_array(ref, "mu"), sigma = diffuse::npz_array(ref, "sigma");
  EXPECT_EQ(mu.scalar_type(), at::kFloat);
  EXPECT_EQ(sigma.scalar_type(), at::kDouble);
  EXPECT_EQ(sigma.sizes(), (std::vector<int64_t>{8, 8}));
  EXPECT_LT((mu - a.mean(0)).abs().max().item<float>(), 1e-6);
  at::Tensor ac = a.to(at::kDouble) - a.to(at::kDouble).mean(0);
  EXPECT_LT((sigma - ac.t().mm(ac) / 39.0).abs().max().item<double>(), 1e-12);
  for (const char* name : {"zip64.npz", "descriptor.npz"}) {
    const diffuse::NpzArchive z = diffuse::npz_load(kNpzDir + name);
    EXPECT_TRUE(at::equal(diffuse::npz_array(z, "mu"), mu)) << name;
    EXPECT_TRUE(at::equal(diffuse::npz_array(z, "sigma"), sigma)) << name;
  }
  EXPECT_FALSE(diffuse::npz_has(ref, "mu.npy"));
  EXPECT_NE(error_of([&] { diffuse::npz_array(ref, "features"); }).find("no array 'features'"),
            std::string::npos);
  EXPECT_NE(error_of([&] { diffuse::npz_load(kNpzDir + "missing.npz"); }).find("missing.npz"),
            std::string::npos);
}

TEST(Npz, WritesWhatItReadsTheSameBytesEachTime) {
  std::vector<std::pair<std::string, at::Tensor>> arrays = {
      {"mu", at::linspace(-1, 1, 5, at::kDouble)},
      {"sigma", at::eye(5, at::kDouble) * 2},
      {"count", at::scalar_tensor(int64_t(1234), at::kLong)},
      {"name", at::arange(65, 70).to(at::kByte)}};
  const std::string bytes = diffuse::npz_serialize(arrays);
  EXPECT_EQ(bytes, diffuse::npz_serialize(arrays));
  const diffuse::NpzArchive z = parse_npz(bytes);
  ASSERT_EQ(z.members.size(), arrays.size());
  for (size_t i = 0; i < arrays.size(); ++i) {
    EXPECT_EQ(z.members[i].first, arrays[i].first);
    at::Tensor back = diffuse::npz_array(z, arrays[i].first);
    EXPECT_EQ(back.scalar_type(), arrays[i].second.scalar_type());
    EXPECT_TRUE(at::equal(back, arrays[i].second)) << arrays[i].first;
  }
  const std::string dir = diffuse_test::make_temp_dir("npz");
  diffuse::npz_save(dir + "/s.npz", arrays);
  EXPECT_EQ(diffuse::read_file(dir + "/s.npz"), bytes);
  diffuse_test::remove_tree(dir);
  EXPECT_NE(error_of([&] {
              diffuse::npz_serialize({{"a", at::ones({1})}, {"a", at::ones({1})}});
            }).find("repeated"),
            std::string::npos);
}

TEST(Npz, RefusesCorruptArchives) {
  const std::string deflated = diffuse::read_file(kNpzDir + "pytorch_fid_a.npz");
  const std::string stored = diffuse::read_file(kNpzDir + "descriptor.npz");
  const std::string zip64 = diffuse::read_file(kNpzDir + "zip64.npz");
  // Every truncation, and every byte inverted in turn: a clean refusal or a parse, never anything else.
  for (const std::string* file : {&deflated, &stored, &zip64}) {
    for (size_t n = 0; n < file->size(); ++n) {
      try {
        parse_npz(file->substr(0, n));
        ADD_FAILURE() << "a prefix of " << n << " bytes parsed";
      } catch (const diffuse::Error& e) {
        EXPECT_EQ(e.exit_code(), diffuse::kExitBadInput);
      }
    }
    for (size_t i = 0; i < file->size(); ++i) {
      std::string bad = *file;
      bad[i] = static_cast<char>(~bad[i]);
      try {
        const diffuse::NpzArchive z = parse_npz(bad);
        for (const auto& m : z.members) diffuse::npz_array(z, m.first);
      } catch (const diffuse::Error& e) {
        EXPECT_EQ(e.exit_code(), diffuse::kExitBadInput);
      }
    }
  }
  // The first member's data, and the first central directory entry.
  const size_t data = 30 + get_u16(deflated, 26) + get_u16(deflated, 28);
  const size_t central = deflated.find("PK\x01\x02");
  ASSERT_NE(central, std::string::npos);
  std::string bad = deflated;
  bad[data + 3] = static_cast<char>(bad[data + 3] ^ 0x10);
  const std::string flipped = error_of([&] { parse_npz(bad); });
  EXPECT_NE(flipped.find("member 'mu.npy'"), std::string::npos) << flipped;  // CRC, inflated size or stream
  bad = stored;
  const size_t stored_data = 30 + get_u16(stored, 26) + get_u16(stored, 28);
  bad[stored_data + 20] = static_cast<char>(bad[stored_data + 20] ^ 1);
  EXPECT_NE(error_of([&] { parse_npz(bad); }).find("'mu.npy': CRC-32 mismatch"), std::string::npos);
  bad = deflated;
  put_u16(bad, central + 10, 12);  // bzip2
  EXPECT_NE(error_of([&] { parse_npz(bad); }).find("compression method 12"), std::string::npos);
  bad = deflated;
  put_u16(bad, central + 8, 1);
  EXPECT_NE(error_of([&] { parse_npz(bad); }).find("encrypted"), std::string::npos);
  bad = deflated;
  put_u32(bad, central + 24, 0x7fffffff);  // far beyond what the compressed bytes can hold
  EXPECT_NE(error_of([&] { parse_npz(bad); }).find("impossible"), std::string::npos);
  EXPECT_NE(error_of([&] { parse_npz(deflated, 100); }).find("larger than 100 bytes"), std::string::npos);
  for (int delta : {-1, 1}) {
    bad = deflated;
    const uint32_t size = get_u16(bad, central + 24) | (get_u16(bad, central + 26) << 16);
    put_u32(bad, central + 24, size + delta);
    EXPECT_NE(error_of([&] { parse_npz(bad); }).find("'mu.npy'"), std::string::npos) << delta;
  }
  // Two members of one name (central and local names changed alike).
  bad = diffuse::npz_serialize({{"aa", at::ones({2})}, {"ab", at::ones({2})}});
  for (size_t p = bad.find("ab.npy"); p != std::string::npos; p = bad.find("ab.npy", p)) bad[p + 1] = 'a';
  EXPECT_NE(error_of([&] { parse_npz(bad); }).find("appears twice"), std::string::npos);
  // ZIP64 sizes without the records that give them.
  bad = zip64;
  const size_t locator = bad.rfind("PK\x06\x07");
  ASSERT_NE(locator, std::string::npos);
  bad[locator] = 'Q';
  EXPECT_NE(error_of([&] { parse_npz(bad); }).find("ZIP64 locator"), std::string::npos);
  EXPECT_NE(error_of([&] { parse_npz("PK\x03\x04 not really a zip archive"); }).find("not a ZIP archive"),
            std::string::npos);
}

}  // namespace
