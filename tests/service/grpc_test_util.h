// Helpers of the gRPC integration tests (server_test, shm_test).
#pragma once

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "medakv/v1/medakv.grpc.pb.h"

namespace medakv::test {

// Sends the given messages, half-closes, and returns the final status.
inline grpc::Status SendRaw(v1::Medakv::Stub& stub, const std::vector<v1::CompressRequest>& messages) {
  grpc::ClientContext ctx;
  auto stream = stub.Compress(&ctx);
  for (const auto& m : messages) {
    if (!stream->Write(m)) break;
  }
  stream->WritesDone();
  v1::CompressResponse r;
  while (stream->Read(&r)) {
  }
  return stream->Finish();
}

// One layer, kv_heads 1, head_dim 4, 8 tokens, f32: key and value 128 bytes,
// query (2 rows) 32 bytes.
inline v1::CompressRequest ValidHeader() {
  v1::CompressRequest req;
  v1::CompressHeader* h = req.mutable_header();
  h->mutable_shape()->set_layers(1);
  h->mutable_shape()->set_kv_heads(1);
  h->mutable_shape()->set_q_heads(1);
  h->mutable_shape()->set_head_dim(4);
  h->mutable_shape()->set_tokens(8);
  h->mutable_shape()->set_dtype(v1::DTYPE_FLOAT32);
  h->set_stats(v1::STATS_FORM_QUERIES);
  h->set_q_tokens(2);
  return req;
}

// The call ended with `code` and a message containing `fragment`.
inline void ExpectStatus(const grpc::Status& s, grpc::StatusCode code, const std::string& fragment) {
  EXPECT_EQ(s.error_code(), code) << s.error_message();
  EXPECT_NE(s.error_message().find(fragment), std::string::npos)
      << "'" << fragment << "' not in: " << s.error_message();
}

}  // namespace medakv::test
