// LlamaEngine::Open on files that are not a supported model: each fails with a clear status and
// no engine. (Behaviour on a real model: tests/python/test_engine_llama_cpp.py.)
#include "kvagent/llama_engine.h"

#include <gguf.h>
#include <gtest/gtest.h>

#include <fstream>

#include "temp_dir.h"

namespace kvagent {
namespace {

std::string WriteGguf(const std::string& dir, const std::string& arch) {
  const std::string path = dir + "/" + arch + ".gguf";
  gguf_context* g = gguf_init_empty();
  gguf_set_val_str(g, "general.architecture", arch.c_str());
  gguf_set_val_u32(g, (arch + ".block_count").c_str(), 2);
  EXPECT_TRUE(gguf_write_to_file(g, path.c_str(), false));
  gguf_free(g);
  return path;
}

StatusOr<std::unique_ptr<LlamaEngine>> OpenPath(const std::string& path) {
  LlamaEngineOptions o;
  o.model_path = path;
  return LlamaEngine::Open(o);
}

TEST(LlamaEngineOpen, UnsupportedArchitectureNamesIt) {
  testing::TempDir dir;
  auto r = OpenPath(WriteGguf(dir.path(), "mamba"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kUnimplemented);
  EXPECT_NE(r.status().ToString().find("'mamba'"), std::string::npos) << r.status().ToString();
  EXPECT_NE(r.status().ToString().find("gemma3"), std::string::npos) << r.status().ToString();
}

TEST(LlamaEngineOpen, SupportedArchitectureWithoutGeometryIsDataLoss) {
  testing::TempDir dir;
  auto r = OpenPath(WriteGguf(dir.path(), "qwen2"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kDataLoss) << r.status().ToString();
}

TEST(LlamaEngineOpen, MissingAndNonGgufFiles) {
  testing::TempDir dir;
  EXPECT_EQ(OpenPath(dir.path() + "/absent.gguf").status().code(), StatusCode::kNotFound);
  const std::string junk = dir.path() + "/junk.gguf";
  std::ofstream(junk) << "this is not a gguf file";
  EXPECT_EQ(OpenPath(junk).status().code(), StatusCode::kDataLoss);
}

TEST(LlamaEngineOpen, BadOptions) {
  LlamaEngineOptions o;
  o.model_path = "/nonexistent.gguf";
  o.context_tokens = 0;
  EXPECT_EQ(LlamaEngine::Open(o).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseLlamaKvType("q4_0").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(*ParseLlamaKvType("q8_0"), LlamaKvType::kQ8_0);
  EXPECT_EQ(LlamaKvTypeName(LlamaKvType::kQ8_0), "q8_0");
}

}  // namespace
}  // namespace kvagent
