// UNetConfig <-> diffusers config.json, and the consistency checks UNet2DModel's constructor relies on.
#include <cmath>

#include "diffuse/common.h"
#include "diffuse/nn/unet.h"

#include <cstdio>
#include "nn/blocks.h"

namespace diffuse {

namespace nn_detail {

// The blocks a config describes: channels in and out of every resnet, attention, resampling.
UNetLayout unet_layout(const UNetConfig& c) {
  const std::vector<int64_t>& ch = c.block_out_channels;
  const int64_t n = static_cast<int64_t>(ch.size());
  UNetLayout layout;
  layout.temb_channels = c.time_embedding_dim.value_or(4 * ch[0]);
  BlockSpec base;
  base.temb_channels = layout.temb_channels;
  base.groups = c.norm_num_groups;
  base.attn_groups = c.norm_num_groups;
  base.eps = c.norm_eps;
  base.dropout = c.dropout;
  auto set_heads = [&](BlockSpec& s) {
    s.head_dim = c.attention_head_dim.value_or(s.out_channels);  // null: one head of all channels
    s.heads = s.head_dim > 0 ? s.out_channels / s.head_dim : 0;
  };
  for (int64_t i = 0; i < n; ++i) {
    BlockSpec s = base;
    s.out_channels = ch[i];
    for (int64_t j = 0; j < c.layers_per_block; ++j)
      s.resnet_in.push_back(j == 0 ? ch[i > 0 ? i - 1 : 0] : ch[i]);
    s.attention = c.down_block_types[i] == "AttnDownBlock2D";
    set_heads(s);
    s.downsample = i != n - 1;
    s.downsample_padding = c.downsample_padding;
    layout.down.push_back(s);
  }
  BlockSpec& mid = layout.mid;
  mid = base;
  mid.out_channels = ch[n - 1];
  mid.resnet_in = {ch[n - 1], ch[n - 1]};
  mid.attention = c.add_attention;
  mid.attn_groups = c.attn_norm_num_groups.value_or(c.norm_num_groups);
  mid.output_scale_factor = c.mid_block_scale_factor;
  set_heads(mid);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t prev = ch[n - 1 - (i > 0 ? i - 1 : 0)];
    const int64_t out = ch[n - 1 - i];
    const int64_t skip_in = ch[n - 1 - std::min(i + 1, n - 1)];
    BlockSpec s = base;
    s.out_channels = out;
    for (int64_t j = 0; j <= c.layers_per_block; ++j) {
      // resnet j sees [x, skip]: x has prev (j == 0) or out channels; the last skip comes from the block
      // below.
      s.resnet_in.push_back((j == 0 ? prev : out) + (j == c.layers_per_block ? skip_in : out));
    }
    s.attention = c.up_block_types[i] == "AttnUpBlock2D";
    set_heads(s);
    s.upsample = i != n - 1;
    layout.up.push_back(s);
  }
  return layout;
}

}  // namespace nn_detail

namespace {

using nlohmann::json;

[[noreturn]] void fail(const std::string& message) { throw input_error("unet config: " + message); }

std::string show(const json& v) {
  std::string s = v.dump();
  return s.size() > 60 ? s.substr(0, 57) + "..." : s;
}

int64_t as_int(const json& v, const std::string& key) { return json_int64(v, "unet config: " + key); }

double as_double(const json& v, const std::string& key) {
  if (!v.is_number()) fail(key + " must be a number, got " + show(v));
  return v.get<double>();
}

bool as_bool(const json& v, const std::string& key) {
  if (!v.is_boolean()) fail(key + " must be true or false, got " + show(v));
  return v.get<bool>();
}

std::string as_string(const json& v, const std::string& key) {
  if (!v.is_string()) fail(key + " must be a string, got " + show(v));
  return v.get<std::string>();
}

std::vector<std::string> as_strings(const json& v, const std::string& key) {
  if (!v.is_array()) fail(key + " must be a list of strings, got " + show(v));
  std::vector<std::string> out;
  for (size_t i = 0; i < v.size(); ++i) out.push_back(as_string(v[i], key + "[" + std::to_string(i) + "]"));
  return out;
}

std::vector<int64_t> as_ints(const json& v, const std::string& key) {
  if (!v.is_array()) fail(key + " must be a list of integers, got " + show(v));
  std::vector<int64_t> out;
  for (size_t i = 0; i < v.size(); ++i) out.push_back(as_int(v[i], key + "[" + std::to_string(i) + "]"));
  return out;
}

// Calls read(value) when key is present; null is accepted only where diffusers allows it (optional).
template <typename F>
void read_key(const json& j, const char* key, F read) {
  auto it = j.find(key);
  if (it == j.end()) return;
  read(*it);
}

void require_one_of(const std::string& key, const std::string& value,
                    const std::vector<std::string>& allowed) {
  for (const std::string& a : allowed)
    if (value == a) return;
  std::string list;
  for (const std::string& a : allowed) list += (list.empty() ? "" : ", ") + a;
  fail(key + " '" + value + "' is not supported (supported: " + list + ")");
}

void check_groups(int64_t channels, int64_t groups, const std::string& key, const std::string& where) {
  if (channels % groups != 0) {
    fail(key + " " + std::to_string(groups) + " does not divide the " + std::to_string(channels) +
         " channels of " + where + " (GroupNorm needs channels divisible by groups)");
  }
}

void check_block(const nn_detail::BlockSpec& s, const std::string& where, bool mid, const UNetConfig& c) {
  for (size_t j = 0; j < s.resnet_in.size(); ++j) {
    check_groups(s.resnet_in[j], s.groups, "norm_num_groups", where + ".resnets." + std::to_string(j));
  }
  check_groups(s.out_channels, s.groups, "norm_num_groups", where);
  if (!s.attention) return;
  check_groups(s.out_channels, s.attn_groups,
               mid && c.attn_norm_num_groups ? "attn_norm_num_groups" : "norm_num_groups",
               where + ".attentions");
  if (s.heads < 1) {
    fail("attention_head_dim " + std::to_string(s.head_dim) + " is larger than the " +
         std::to_string(s.out_channels) + " channels of " + where + " (no attention head fits)");
  }
}

}  // namespace

void validate_unet_config(const UNetConfig& c) {
  const size_t n = c.block_out_channels.size();
  if (n == 0) fail("block_out_channels is empty");
  if (n > 16) fail("block_out_channels has " + std::to_string(n) + " entries (at most 16)");
  if (c.layers_per_block > 1000)
    fail("layers_per_block " + std::to_string(c.layers_per_block) + " is too large");
  if (c.down_block_types.size() != n || c.up_block_types.size() != n) {
    fail("down_block_types (" + std::to_string(c.down_block_types.size()) + "), up_block_types (" +
         std::to_string(c.up_block_types.size()) + ") and block_out_channels (" + std::to_string(n) +
         ") must have the same number of entries");
  }
  for (size_t i = 0; i < n; ++i) {
    require_one_of("down_block_types[" + std::to_string(i) + "]", c.down_block_types[i],
                   {"DownBlock2D", "AttnDownBlock2D"});
    require_one_of("up_block_types[" + std::to_string(i) + "]", c.up_block_types[i],
                   {"UpBlock2D", "AttnUpBlock2D"});
    if (c.block_out_channels[i] < 1) fail("block_out_channels[" + std::to_string(i) + "] must be positive");
  }
  require_one_of("time_embedding_type", c.time_embedding_type, {"positional"});
  require_one_of("act_fn", c.act_fn, {"silu", "swish"});
  require_one_of("resnet_time_scale_shift", c.resnet_time_scale_shift, {"default"});
  require_one_of("downsample_type", c.downsample_type, {"conv"});
  require_one_of("upsample_type", c.upsample_type, {"conv"});
  if (c.class_embed_type)
    fail("class_embed_type '" + *c.class_embed_type + "' is not supported (supported: null)");
  if (c.sample_size < 1) fail("sample_size must be positive");
  if (c.in_channels < 1) fail("in_channels must be positive");
  if (c.out_channels < 1) fail("out_channels must be positive");
  if (c.layers_per_block < 1) fail("layers_per_block must be at least 1");
  if (c.downsample_padding != 0 && c.downsample_padding != 1) {
    fail("downsample_padding " + std::to_string(c.downsample_padding) +
         " is not supported (supported: 0, 1)");
  }
  if (!(c.dropout >= 0.0 && c.dropout < 1.0)) fail("dropout must be in [0, 1)");
  if (!(c.norm_eps > 0.0) || !std::isfinite(c.norm_eps)) fail("norm_eps must be positive");
  if (!std::isfinite(c.mid_block_scale_factor) || c.mid_block_scale_factor == 0.0) {
    fail("mid_block_scale_factor must be a finite non-zero number");
  }
  if (c.norm_num_groups < 1) fail("norm_num_groups must be positive");
  if (c.attn_norm_num_groups && *c.attn_norm_num_groups < 1)
    fail("attn_norm_num_groups must be positive or null");
  if (c.attention_head_dim && *c.attention_head_dim < 1) fail("attention_head_dim must be positive or null");
  if (c.num_class_embeds && *c.num_class_embeds < 1) fail("num_class_embeds must be positive or null");
  if (c.time_embedding_dim && *c.time_embedding_dim < 1) fail("time_embedding_dim must be positive or null");
  const int64_t half = c.block_out_channels[0] / 2;
  if (half > 0 && half == c.freq_shift) {
    fail("freq_shift " + std::to_string(c.freq_shift) +
         " equals block_out_channels[0] / 2 (the sinusoid divides by zero)");
  }

  const nn_detail::UNetLayout layout = nn_detail::unet_layout(c);
  // A size guard before anything is allocated: the 3x3 convolution weights alone, counted in double.
  double weights = 0.0;
  auto count_block = [&](const nn_detail::BlockSpec& s) {
    for (int64_t in : s.resnet_in)
      weights += 9.0 * (double(in) + double(s.out_channels)) * double(s.out_channels);
  };
  for (const auto& s : layout.down) count_block(s);
  for (const auto& s : layout.up) count_block(s);
  count_block(layout.mid);
  weights += double(layout.temb_channels) * double(layout.temb_channels) +
             double(c.num_class_embeds.value_or(0)) * double(layout.temb_channels);
  if (weights > 4.0e9) {
    char billions[32];
    std::snprintf(billions, sizeof(billions), "%.3g", weights / 1e9);  // may exceed int64
    fail(std::string("the config describes about ") + billions +
         " billion parameters (limit 4 billion); check block_out_channels, layers_per_block and "
         "num_class_embeds");
  }
  check_groups(c.block_out_channels[0], c.norm_num_groups, "norm_num_groups", "conv_norm_out");
  for (size_t i = 0; i < n; ++i) check_block(layout.down[i], "down_blocks." + std::to_string(i), false, c);
  check_block(layout.mid, "mid_block", true, c);
  for (size_t i = 0; i < n; ++i) check_block(layout.up[i], "up_blocks." + std::to_string(i), false, c);
}

UNetConfig unet_config_from_json(const nlohmann::json& j) {
  if (!j.is_object()) fail("expected a JSON object, got " + show(j));
  UNetConfig c;
  read_key(j, "sample_size", [&](const json& v) {
    if (v.is_null()) return;  // diffusers' default None: keep ours
    if (v.is_array()) {
      std::vector<int64_t> hw = as_ints(v, "sample_size");
      if (hw.size() != 2 || hw[0] != hw[1])
        fail("sample_size must be an integer or a square [h, w], got " + show(v));
      c.sample_size = hw[0];
    } else {
      c.sample_size = as_int(v, "sample_size");
    }
  });
  read_key(j, "in_channels", [&](const json& v) { c.in_channels = as_int(v, "in_channels"); });
  read_key(j, "out_channels", [&](const json& v) { c.out_channels = as_int(v, "out_channels"); });
  read_key(j, "center_input_sample",
           [&](const json& v) { c.center_input_sample = as_bool(v, "center_input_sample"); });
  read_key(j, "time_embedding_type",
           [&](const json& v) { c.time_embedding_type = as_string(v, "time_embedding_type"); });
  read_key(j, "freq_shift", [&](const json& v) { c.freq_shift = as_int(v, "freq_shift"); });
  read_key(j, "flip_sin_to_cos", [&](const json& v) { c.flip_sin_to_cos = as_bool(v, "flip_sin_to_cos"); });
  read_key(j, "down_block_types",
           [&](const json& v) { c.down_block_types = as_strings(v, "down_block_types"); });
  read_key(j, "up_block_types", [&](const json& v) { c.up_block_types = as_strings(v, "up_block_types"); });
  read_key(j, "block_out_channels",
           [&](const json& v) { c.block_out_channels = as_ints(v, "block_out_channels"); });
  read_key(j, "layers_per_block", [&](const json& v) { c.layers_per_block = as_int(v, "layers_per_block"); });
  read_key(j, "mid_block_scale_factor",
           [&](const json& v) { c.mid_block_scale_factor = as_double(v, "mid_block_scale_factor"); });
  read_key(j, "downsample_padding",
           [&](const json& v) { c.downsample_padding = as_int(v, "downsample_padding"); });
  read_key(j, "downsample_type", [&](const json& v) { c.downsample_type = as_string(v, "downsample_type"); });
  read_key(j, "upsample_type", [&](const json& v) { c.upsample_type = as_string(v, "upsample_type"); });
  read_key(j, "dropout", [&](const json& v) { c.dropout = as_double(v, "dropout"); });
  read_key(j, "act_fn", [&](const json& v) { c.act_fn = as_string(v, "act_fn"); });
  read_key(j, "attention_head_dim", [&](const json& v) {
    c.attention_head_dim =
        v.is_null() ? std::nullopt : std::optional<int64_t>(as_int(v, "attention_head_dim"));
  });
  read_key(j, "norm_num_groups", [&](const json& v) { c.norm_num_groups = as_int(v, "norm_num_groups"); });
  read_key(j, "attn_norm_num_groups", [&](const json& v) {
    c.attn_norm_num_groups =
        v.is_null() ? std::nullopt : std::optional<int64_t>(as_int(v, "attn_norm_num_groups"));
  });
  read_key(j, "norm_eps", [&](const json& v) { c.norm_eps = as_double(v, "norm_eps"); });
  read_key(j, "resnet_time_scale_shift",
           [&](const json& v) { c.resnet_time_scale_shift = as_string(v, "resnet_time_scale_shift"); });
  read_key(j, "add_attention", [&](const json& v) { c.add_attention = as_bool(v, "add_attention"); });
  read_key(j, "class_embed_type", [&](const json& v) {
    c.class_embed_type =
        v.is_null() ? std::nullopt : std::optional<std::string>(as_string(v, "class_embed_type"));
  });
  read_key(j, "num_class_embeds", [&](const json& v) {
    c.num_class_embeds = v.is_null() ? std::nullopt : std::optional<int64_t>(as_int(v, "num_class_embeds"));
  });
  read_key(j, "time_embedding_dim", [&](const json& v) {
    c.time_embedding_dim =
        v.is_null() ? std::nullopt : std::optional<int64_t>(as_int(v, "time_embedding_dim"));
  });
  // Keys with a single supported value (not stored): the mid block type.
  read_key(j, "mid_block_type", [&](const json& v) {
    if (v.is_null()) fail("mid_block_type null (no mid block) is not supported (supported: UNetMidBlock2D)");
    require_one_of("mid_block_type", as_string(v, "mid_block_type"), {"UNetMidBlock2D"});
  });
  read_key(j, "attention_legacy_order", [&](const json& v) {
    if (as_bool(v, "attention_legacy_order"))
      fail("attention_legacy_order true is not supported (supported: false)");
  });
  validate_unet_config(c);
  return c;
}

nlohmann::json unet_config_to_json(const UNetConfig& c) {
  auto opt = [](const auto& o) { return o ? json(*o) : json(nullptr); };
  json j = json::object();
  j["sample_size"] = c.sample_size;
  j["in_channels"] = c.in_channels;
  j["out_channels"] = c.out_channels;
  j["center_input_sample"] = c.center_input_sample;
  j["time_embedding_type"] = c.time_embedding_type;
  j["freq_shift"] = c.freq_shift;
  j["flip_sin_to_cos"] = c.flip_sin_to_cos;
  j["down_block_types"] = c.down_block_types;
  j["up_block_types"] = c.up_block_types;
  j["block_out_channels"] = c.block_out_channels;
  j["layers_per_block"] = c.layers_per_block;
  j["mid_block_scale_factor"] = c.mid_block_scale_factor;
  j["mid_block_type"] = "UNetMidBlock2D";
  j["downsample_padding"] = c.downsample_padding;
  j["downsample_type"] = c.downsample_type;
  j["upsample_type"] = c.upsample_type;
  j["dropout"] = c.dropout;
  j["act_fn"] = c.act_fn;
  j["attention_head_dim"] = opt(c.attention_head_dim);
  j["norm_num_groups"] = c.norm_num_groups;
  j["attn_norm_num_groups"] = opt(c.attn_norm_num_groups);
  j["norm_eps"] = c.norm_eps;
  j["resnet_time_scale_shift"] = c.resnet_time_scale_shift;
  j["add_attention"] = c.add_attention;
  j["class_embed_type"] = opt(c.class_embed_type);
  j["num_class_embeds"] = opt(c.num_class_embeds);
  j["time_embedding_dim"] = opt(c.time_embedding_dim);
  j["num_train_timesteps"] = nullptr;
  return j;
}

}  // namespace diffuse
