// Safetensors: round trips, the diffusers fixtures, and a table of malformed inputs.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "diffuse/common.h"
#include "diffuse/io/file.h"
#include "diffuse/io/safetensors.h"
#include "test_util.h"

namespace fs = std::filesystem;

namespace {

const std::string kTiny = std::string(DIFFUSE_FIXTURES) + "/diffusers_unet2d/tiny/";
const std::string kData = std::string(DIFFUSE_TEST_DATA) + "/safetensors/";

diffuse::TensorDict parse(const std::string& bytes, diffuse::Metadata* metadata = nullptr) {
  return diffuse::safetensors_parse(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), "test.st",
                                    metadata);
}

std::string u64_le(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((v >> (8 * i)) & 0xff);
  return s;
}

// A file image: length prefix, header text exactly as given, data bytes.
std::string image(const std::string& header, const std::string& data = "") {
  return u64_le(header.size()) + header + data;
}

// Runs fn, expects an input_error whose message contains `expect`; returns the message.
template <typename Fn>
std::string expect_input_error(Fn fn, const std::string& expect) {
  try {
    fn();
  } catch (const diffuse::Error& e) {
    EXPECT_EQ(e.exit_code(), diffuse::kExitBadInput) << e.what();
    EXPECT_NE(std::string(e.what()).find(expect), std::string::npos)
        << "message \"" << e.what() << "\" lacks \"" << expect << "\"";
    for (char ch : std::string(e.what()))
      EXPECT_TRUE(static_cast<unsigned char>(ch) >= 0x20 && static_cast<unsigned char>(ch) < 0x7f)
          << "message has a control or non-ASCII byte: " << e.what();
    return e.what();
  }
  ADD_FAILURE() << "no error; expected one mentioning \"" << expect << "\"";
  return "";
}

std::vector<std::string> names(const diffuse::TensorDict& t) {
  std::vector<std::string> out;
  for (const auto& kv : t) out.push_back(kv.first);
  return out;
}

TEST(Safetensors, RoundTripsEveryDtype) {
  at::manual_seed(7);
  diffuse::TensorDict in = {
      {"f64", at::randn({3, 2}, at::kDouble)},
      {"f32", at::randn({2, 3, 4})},
      {"f16", at::randn({5}).to(at::kHalf)},
      {"bf16", at::randn({2, 2}).to(at::kBFloat16)},
      {"i64", at::randint(-(int64_t(1) << 40), int64_t(1) << 40, {4}, at::kLong)},
      {"i32", at::randint(-100000, 100000, {2, 2}, at::kInt)},
      {"i16", at::randint(-30000, 30000, {3}, at::kShort)},
      {"i8", at::randint(-128, 128, {6}, at::kChar)},
      {"u8", at::randint(0, 256, {1, 6}, at::kByte)},
      {"bool", at::randint(0, 2, {7}, at::kByte).to(at::kBool)},
      {"scalar", at::scalar_tensor(1.5, at::kFloat)},
      {"empty", at::empty({0, 3}, at::kInt)},
  };
  diffuse::Metadata meta_in = {{"format", "pt"}, {"step", "12"}};
  diffuse::Metadata meta_out;
  diffuse::TensorDict out = parse(diffuse::safetensors_serialize(in, meta_in), &meta_out);
  EXPECT_EQ(meta_out, meta_in);
  ASSERT_EQ(out.size(), in.size());
  for (const auto& kv : in) {
    const at::Tensor* t = diffuse::find_tensor(out, kv.first);
    ASSERT_NE(t, nullptr) << kv.first;
    EXPECT_EQ(t->scalar_type(), kv.second.scalar_type()) << kv.first;
    EXPECT_EQ(t->sizes(), kv.second.sizes()) << kv.first;
    EXPECT_TRUE(at::equal(*t, kv.second)) << kv.first;
  }
  EXPECT_EQ(diffuse::find_tensor(out, "absent"), nullptr);
}

TEST(Safetensors, ReserializationIsByteExact) {
  at::manual_seed(3);
  diffuse::TensorDict in = {
      {"w", at::randn({4, 3})},
      {"h", at::randn({9}).to(at::kHalf)},
      {"b", at::randn({2, 5}).to(at::kBFloat16)},
      {"t", at::randint(0, 1000, {3}, at::kLong)},
  };
  const std::string first = diffuse::safetensors_serialize(in, {{"format", "pt"}});
  diffuse::Metadata meta;
  const std::string second = diffuse::safetensors_serialize(parse(first, &meta), meta);
  EXPECT_EQ(first, second);
  // The committed file was written by an independent (Python) writer with the same layout.
  const std::string file = diffuse::read_file(kData + "valid_small.safetensors");
  diffuse::TensorDict small = parse(file, &meta);
  EXPECT_EQ(diffuse::safetensors_serialize(small, meta), file);
}

TEST(Safetensors, SerializeLayout) {
  // Inserted out of order, one of them non-contiguous.
  at::Tensor m = at::arange(6, at::kFloat).reshape({2, 3});
  diffuse::TensorDict in = {{"zeta", m.t()}, {"alpha", at::ones({2}, at::kByte)}};
  const std::string bytes = diffuse::safetensors_serialize(in);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(bytes[i]);
  EXPECT_EQ((8 + n) % 8, 0u);
  const std::string header = bytes.substr(8, n);
  // Compact, no "__metadata__" when empty, sorted by name, padded with spaces.
  const std::string expected_json =
      "{\"alpha\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]},"
      "\"zeta\":{\"dtype\":\"F32\",\"shape\":[3,2],\"data_offsets\":[2,26]}}";
  EXPECT_EQ(header.substr(0, expected_json.size()), expected_json);
  EXPECT_EQ(header.find_first_not_of(' ', expected_json.size()), std::string::npos);
  EXPECT_EQ(bytes.size(), 8 + n + 26);
  // Data in name order; the transposed tensor stored in its own logical (contiguous) order.
  EXPECT_EQ(bytes.substr(8 + n, 2), std::string("\x01\x01"));
  float values[6];
  std::memcpy(values, bytes.data() + 8 + n + 2, sizeof(values));
  const float expected[6] = {0, 3, 1, 4, 2, 5};
  for (int i = 0; i < 6; ++i) EXPECT_EQ(values[i], expected[i]) << i;
  diffuse::TensorDict out = parse(bytes);
  EXPECT_EQ(names(out), (std::vector<std::string>{"alpha", "zeta"}));
  EXPECT_TRUE(at::equal(out[1].second, m.t()));
}

TEST(Safetensors, SerializeRejectsWhatItCannotStore) {
  expect_input_error(
      [] {
        diffuse::safetensors_serialize({{"c", at::zeros({2}, at::kComplexFloat)}});
      },
      "ComplexFloat");
  expect_input_error(
      [] {
        diffuse::safetensors_serialize({{"a", at::zeros({1})}, {"a", at::zeros({1})}});
      },
      "duplicate tensor name");
  expect_input_error([] { diffuse::safetensors_serialize({{"u", at::Tensor()}}); }, "undefined");
  expect_input_error(
      [] {
        diffuse::safetensors_serialize({{"__metadata__", at::zeros({1})}});
      },
      "__metadata__");
  expect_input_error(
      [] {
        diffuse::safetensors_serialize({{std::string("bad\xff"), at::zeros({1})}});
      },
      "UTF-8");
}

TEST(Safetensors, LoadsTheDiffusersTinyUnet) {
  diffuse::Metadata meta;
  diffuse::TensorDict t = diffuse::safetensors_load(kTiny + "diffusion_pytorch_model.safetensors", &meta);
  EXPECT_EQ(meta, (diffuse::Metadata{{"format", "pt"}}));
  ASSERT_EQ(t.size(), 144u);
  int64_t params = 0;
  for (const auto& kv : t) {
    EXPECT_EQ(kv.second.scalar_type(), at::kFloat) << kv.first;
    EXPECT_TRUE(kv.second.is_contiguous());
    params += kv.second.numel();
  }
  EXPECT_EQ(params, 702499);
  const at::Tensor* conv_in = diffuse::find_tensor(t, "conv_in.weight");
  ASSERT_NE(conv_in, nullptr);
  EXPECT_EQ(conv_in->sizes(), (std::vector<int64_t>{32, 3, 3, 3}));
  // The writer stores sorted keys, so file order is name order here.
  EXPECT_EQ(t.front().first, "conv_in.bias");
  EXPECT_TRUE(
      std::is_sorted(t.begin(), t.end(), [](const auto& a, const auto& b) { return a.first < b.first; }));
  // Initialized weights are finite and not all zero.
  EXPECT_TRUE(at::isfinite(*conv_in).all().item<bool>());
  EXPECT_GT(conv_in->abs().sum().item<double>(), 1.0);
  // Re-serialization reproduces the file byte for byte.
  EXPECT_EQ(diffuse::safetensors_serialize(t, meta),
            diffuse::read_file(kTiny + "diffusion_pytorch_model.safetensors"));
}

TEST(Safetensors, LoadsTheDiffusersIoFile) {
  diffuse::Metadata meta;
  diffuse::TensorDict t = diffuse::safetensors_load(kTiny + "io.safetensors", &meta);
  EXPECT_EQ(names(t),
            (std::vector<std::string>{"expected", "expected_f32", "sample", "time_proj", "timestep"}));
  const std::vector<int64_t> image_shape = {2, 3, 16, 16};
  EXPECT_EQ(t[0].second.sizes(), image_shape);
  EXPECT_EQ(t[1].second.sizes(), image_shape);
  EXPECT_EQ(t[2].second.sizes(), image_shape);
  EXPECT_EQ(t[3].second.sizes(), (std::vector<int64_t>{2, 32}));
  EXPECT_EQ(t[4].second.scalar_type(), at::kLong);
  EXPECT_EQ(t[4].second[0].item<int64_t>(), 10);
  EXPECT_EQ(t[4].second[1].item<int64_t>(), 937);
  // `sample` is randn: mean near 0 and std near 1 over 1536 values.
  EXPECT_NEAR(t[2].second.mean().item<double>(), 0.0, 0.1);
  EXPECT_NEAR(t[2].second.std().item<double>(), 1.0, 0.1);
  // float64-computed and float32-computed outputs agree to float32 precision.
  EXPECT_LT((t[0].second - t[1].second).abs().max().item<double>(), 1e-4);
  EXPECT_EQ(diffuse::safetensors_serialize(t, meta), diffuse::read_file(kTiny + "io.safetensors"));
}

TEST(Safetensors, CommittedValidFileHasEveryValue) {
  diffuse::Metadata meta;
  diffuse::TensorDict t = diffuse::safetensors_load(kData + "valid_small.safetensors", &meta);
  EXPECT_EQ(meta.at("note"), "diffuse test");
  EXPECT_EQ(names(t), (std::vector<std::string>{"a.mask", "b.bf16", "c.half", "d.steps", "e.pixels",
                                                "f.weight", "g.scalar", "h.empty"}));
  EXPECT_EQ(t[0].second.scalar_type(), at::kBool);
  EXPECT_TRUE(at::equal(t[0].second.to(at::kByte), at::tensor({1, 0, 1}, at::kByte)));
  EXPECT_EQ(t[1].second.scalar_type(), at::kBFloat16);
  EXPECT_EQ(t[1].second[0][1].item<float>(), -2.0f);
  EXPECT_NEAR(t[1].second[1][0].item<float>(), 1.0 / 3.0, 2e-3);
  EXPECT_EQ(t[2].second[2].item<float>(), 65504.0f);
  EXPECT_EQ(t[3].second[1].item<int64_t>(), -937);
  EXPECT_EQ(t[4].second[1][2].item<int64_t>(), 255);
  EXPECT_EQ(t[5].second.sizes(), (std::vector<int64_t>{2, 1}));
  EXPECT_EQ(t[5].second[1][0].item<float>(), -0.125f);
  EXPECT_EQ(t[6].second.dim(), 0);
  EXPECT_DOUBLE_EQ(t[6].second.item<double>(), 2.718281828459045);
  EXPECT_EQ(t[7].second.sizes(), (std::vector<int64_t>{0, 4}));
}

TEST(Safetensors, SaveLoadThroughAFile) {
  const std::string dir =
      (diffuse_test::temp_root() / ("diffuse_io_st_" + std::to_string(::getpid()))).string();
  diffuse::make_directories(dir);
  const std::string path = diffuse::path_join(dir, "model.safetensors");
  diffuse::TensorDict in = {{"x", at::arange(10, at::kFloat)}};
  diffuse::safetensors_save(path, in, {{"k", "v"}});
  diffuse::Metadata meta;
  diffuse::TensorDict out = diffuse::safetensors_load(path, &meta);
  EXPECT_EQ(meta.at("k"), "v");
  EXPECT_TRUE(at::equal(out.at(0).second, in[0].second));
  diffuse_test::remove_tree(dir);
}

TEST(Safetensors, HeaderLengthWithPickleLikeLowByteIsStillSafetensors) {
  // N = 0x280 puts 0x80 0x02 at the start of the file, the same bytes as a pickle's PROTO 2.
  std::string header = "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}";
  header.append(0x280 - header.size(), ' ');
  diffuse::TensorDict t = parse(image(header, "\x2a"));
  ASSERT_EQ(t.size(), 1u);
  EXPECT_EQ(t[0].second.item<int64_t>(), 42);
}

TEST(Safetensors, EmptyHeaderObjectIsAValidEmptyFile) {
  diffuse::Metadata meta = {{"stale", "value"}};
  EXPECT_TRUE(parse(image("{}      "), &meta).empty());
  EXPECT_TRUE(meta.empty());
  EXPECT_EQ(diffuse::safetensors_serialize({}), image("{}      "));
}

struct BadCase {
  const char* what;
  std::string bytes;
  const char* expect;  // a piece of the error message
};

std::string one(const std::string& entry, const std::string& data) {
  return image("{\"a\":" + entry + "}", data);
}

TEST(Safetensors, RejectsMalformedInputs) {
  const std::string z4(4, '\0');
  const std::vector<BadCase> cases = {
      {"empty file", "", "too short"},
      {"truncated prefix", std::string("\x10\x00\x00", 3), "too short"},
      {"header length > file size", u64_le(100) + "{}", "exceeds the file size"},
      {"header length > max", u64_le(diffuse::kSafetensorsMaxHeader + 1) + "{}", "exceeds the limit"},
      {"header length near 2^64", u64_le(~uint64_t(0) - 3) + "{}", "exceeds the limit"},
      {"zero-length header", u64_le(0), "not a JSON object"},
      {"invalid JSON", image("{\"a\":{\"dtype\":"), "invalid JSON"},
      {"text after the JSON", image("{} x"), "invalid JSON"},
      {"invalid UTF-8", image("{\"\xff\":{}}"), "invalid JSON"},
      {"header not an object", image("[1,2,3]"), "not a JSON object"},
      {"leading space", image(" {}"), "not a JSON object"},
      {"entry not an object", image("{\"a\":[1]}"), "entry is not a JSON object"},
      {"missing field", one("{\"dtype\":\"U8\",\"shape\":[4]}", z4), "missing field \"data_offsets\""},
      {"unknown field", one("{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4],\"x\":1}", z4),
       "unknown field \"x\""},
      {"dtype not a string", one("{\"dtype\":4,\"shape\":[4],\"data_offsets\":[0,4]}", z4),
       "\"dtype\" is not a string"},
      {"unknown dtype", one("{\"dtype\":\"F8\",\"shape\":[4],\"data_offsets\":[0,4]}", z4),
       "unknown dtype \"F8\""},
      {"lower-case dtype", one("{\"dtype\":\"f32\",\"shape\":[1],\"data_offsets\":[0,4]}", z4),
       "unknown dtype"},
      {"shape not an array", one("{\"dtype\":\"U8\",\"shape\":4,\"data_offsets\":[0,4]}", z4),
       "\"shape\" is not an array"},
      {"negative shape", one("{\"dtype\":\"U8\",\"shape\":[-4],\"data_offsets\":[0,4]}", z4),
       "negative dimension -4"},
      {"fractional shape", one("{\"dtype\":\"U8\",\"shape\":[4.0],\"data_offsets\":[0,4]}", z4),
       "not an integer"},
      {"string in shape", one("{\"dtype\":\"U8\",\"shape\":[\"4\"],\"data_offsets\":[0,4]}", z4),
       "not an integer"},
      {"shape overflow",
       one("{\"dtype\":\"U8\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,4]}", z4),
       "too many elements"},
      {"huge dims hidden by a zero",
       one("{\"dtype\":\"U8\",\"shape\":[9223372036854775807,0,9223372036854775807],\"data_offsets\":[0,0]}",
           ""),
       "too many elements"},
      {"shape/byte-count mismatch",
       one("{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,12]}", std::string(12, 'x')), "needs 16"},
      {"byte count overflow",
       one("{\"dtype\":\"F64\",\"shape\":[4611686018427387904],\"data_offsets\":[0,4]}", z4), "needs more"},
      {"offsets not a pair", one("{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0]}", z4),
       "data_offsets"},
      {"negative offset", one("{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[-4,0]}", z4),
       "data_offsets"},
      {"offsets not integers", one("{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[\"0\",4]}", z4),
       "data_offsets"},
      {"begin > end", one("{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[8,4]}", std::string(8, 'x')),
       "begin 8 > end 4"},
      {"offsets out of bounds",
       one("{\"dtype\":\"U8\",\"shape\":[16],\"data_offsets\":[0,16]}", std::string(8, 'x')),
       "out of bounds"},
      {"overlapping offsets",
       image("{\"a\":{\"dtype\":\"U8\",\"shape\":[8],\"data_offsets\":[0,8]},"
             "\"b\":{\"dtype\":\"U8\",\"shape\":[8],\"data_offsets\":[4,12]}}",
             std::string(12, 'x')),
       "overlap"},
      {"same range twice",
       image("{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]},"
             "\"b\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]}}",
             z4),
       "overlap"},
      {"gap between tensors",
       image("{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]},"
             "\"b\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[8,12]}}",
             std::string(12, 'x')),
       "gap of 4 unused bytes"},
      {"gap before the first tensor",
       one("{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[4,8]}", std::string(8, 'x')),
       "gap of 4 unused bytes"},
      {"trailing bytes", one("{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]}", std::string(7, 'x')),
       "3 trailing bytes"},
      {"data but no tensors", image("{}", "abc"), "3 trailing bytes"},
      {"duplicate names",
       image("{\"a\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]},"
             "\"a\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[2,4]}}",
             z4),
       "duplicate tensor name \"a\""},
      {"duplicate field", one("{\"dtype\":\"U8\",\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]}", z4),
       "duplicate key \"dtype\""},
      {"metadata not an object", image("{\"__metadata__\":[\"x\"]}"),
       "\"__metadata__\" is not a JSON object"},
      {"metadata value not a string", image("{\"__metadata__\":{\"step\":3}}"),
       "value of \"step\" is not a string"},
      {"bool byte not 0/1",
       one("{\"dtype\":\"BOOL\",\"shape\":[2],\"data_offsets\":[0,2]}", std::string("\x01\x02", 2)),
       "BOOL byte value 2"},
      {"legacy pickle", std::string("\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19\x2e", 15),
       "pickle-based PyTorch file"},
      {"short pickle", std::string("\x80\x04\x95", 3), "pickle can execute code"},
      {"zip archive", std::string("PK\x03\x04\x14\x00\x00\x00\x08\x00", 10) + "archive/data.pkl",
       "pickle-based"},
      {"control character in name", image("{\"a\\nb\":[]}"), "tensor \"a\\nb\""},
      {"very long name and shape",
       image("{\"" + std::string(5000, 'n') + "\":{\"dtype\":\"U8\",\"shape\":[" + std::string(3000, '[') +
             std::string(3000, ']') + "],\"data_offsets\":[0,0]}}"),
       "nnn\"...: shape entry [[[...]]] is not an integer"},
      // Found by fuzz_safetensors: printing a deeply nested value in a message overflowed the stack.
      {"deeply nested offsets",
       one("{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[" + std::string(200000, '[') +
               std::string(200000, ']') + ",1,2,3,4,5]}",
           ""),
       "got [[[...]],1,2,3,...]"},
  };
  for (const BadCase& c : cases) {
    SCOPED_TRACE(c.what);
    const std::string message = expect_input_error([&] { parse(c.bytes); }, c.expect);
    EXPECT_EQ(message.rfind("test.st: ", 0), 0u) << "message does not name the input: " << message;
    EXPECT_LT(message.size(), 400u) << message;
  }
}

TEST(Safetensors, RejectsCommittedMalformedFiles) {
  const std::vector<std::pair<const char*, const char*>> files = {
      {"truncated_prefix.safetensors", "too short"},
      {"header_too_long.safetensors", "exceeds the file size"},
      {"invalid_json.safetensors", "invalid JSON"},
      {"unknown_dtype.safetensors", "unknown dtype \"F8_E4M3\""},
      {"overlap.safetensors", "overlap"},
      {"gap.safetensors", "gap of 4 unused bytes"},
      {"trailing_bytes.safetensors", "4 trailing bytes"},
      {"duplicate_names.safetensors", "duplicate tensor name"},
      {"shape_mismatch.safetensors", "needs 16"},
      {"pickle_legacy.safetensors", "pickle-based PyTorch file"},
      {"pickle_zip.safetensors", "pickle-based PyTorch file"},
  };
  for (const auto& f : files) {
    SCOPED_TRACE(f.first);
    const std::string path = kData + f.first;
    const std::string message = expect_input_error([&] { diffuse::safetensors_load(path); }, f.second);
    EXPECT_EQ(message.rfind(path, 0), 0u) << message;
  }
}

TEST(Safetensors, RefusesPickleExtensionsWithoutReading) {
  for (const char* path : {"model.pt", "dir/weights.PTH", "pytorch_model.bin", "sd.ckpt", "x.pkl"}) {
    SCOPED_TRACE(path);
    expect_input_error([&] { diffuse::safetensors_load(path); }, "pickle can execute code");
  }
  EXPECT_NO_THROW(diffuse::refuse_pickle("model.safetensors"));
  EXPECT_NO_THROW(diffuse::refuse_pickle("runs.pt/model.safetensors"));
  EXPECT_NO_THROW(diffuse::refuse_pickle("Makefile"));
  expect_input_error([] { diffuse::safetensors_load(kData + "does_not_exist.safetensors"); }, "cannot open");
}

}  // namespace
