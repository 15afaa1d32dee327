// client/python/proto_dict.h: protobuf messages as Python dicts, in an embedded interpreter.
// The records of local.proto, and messages of peer.proto and config.proto for the field kinds
// local.proto lacks (bytes, floats, repeated scalars, enums).
#include "client/python/proto_dict.h"

#include <gtest/gtest.h>
#include <pybind11/embed.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "proto/mapl/v1/config.pb.h"
#include "proto/mapl/v1/local.pb.h"
#include "proto/mapl/v1/peer.pb.h"

namespace mapl {
namespace client {
namespace {

namespace py = pybind11;

// One interpreter for the process, never finalized (pybind11 cannot re-create one reliably).
void EnsureInterpreter() {
  static py::scoped_interpreter* interpreter = new py::scoped_interpreter();
  (void)interpreter;
}

// The keys of `d`, in order.
std::vector<std::string> Keys(const py::dict& d) {
  std::vector<std::string> keys;
  for (auto item : d) keys.push_back(item.first.cast<std::string>());
  return keys;
}

// The descriptor's field names, in declaration order.
std::vector<std::string> FieldNames(const google::protobuf::Descriptor* d) {
  std::vector<std::string> names;
  for (int i = 0; i < d->field_count(); ++i) names.push_back(d->field(i)->name());
  return names;
}

TEST(ProtoDictTest, EveryFieldOfTheRecordIsAKeyEvenWhenUnset) {
  EnsureInterpreter();
  const v1::BoundaryStats empty;
  py::dict d = MessageToDict(empty);
  EXPECT_EQ(Keys(d), FieldNames(v1::BoundaryStats::descriptor()));
  EXPECT_EQ(d["frames_sent"].cast<uint64_t>(), 0u);
  EXPECT_EQ(d["role"].cast<std::string>(), "");
  EXPECT_FALSE(d["has_dictionary"].cast<bool>());
  // The unset nested record reads as its defaults, with every one of its fields.
  py::dict link = d["link"];
  EXPECT_EQ(Keys(link), FieldNames(v1::LinkStats::descriptor()));
  EXPECT_EQ(py::len(link["sent"]), 0u);
  EXPECT_TRUE(py::isinstance<py::dict>(link["sent"]));
}

TEST(ProtoDictTest, ScalarsNestedRecordsAndMapsKeepTheirValuesAndTypes) {
  EnsureInterpreter();
  v1::BoundaryStats s;
  s.set_id(3);
  s.set_role("upstream");
  s.set_dictionary_version(uint64_t{1} << 63 | 5);  // Above 2^53: must stay exact.
  s.set_dictionary_checksum(~uint64_t{0});          // fixed64
  s.set_orthogonality_error(1.25e-7);
  s.set_raw_bytes_sent(1000);
  s.set_has_dictionary(true);
  v1::LinkStats* link = s.mutable_link();
  link->set_connected(true);
  link->set_last_rtt_seconds(0.5);
  (*link->mutable_sent())["frame"].set_messages(7);
  (*link->mutable_sent())["frame"].set_bytes(7000);
  (*link->mutable_sent())["ack"].set_messages(2);
  (*link->mutable_received())["delta"].set_bytes(99);

  py::dict d = MessageToDict(s);
  EXPECT_EQ(d["id"].cast<uint32_t>(), 3u);
  EXPECT_EQ(d["role"].cast<std::string>(), "upstream");
  EXPECT_TRUE(py::isinstance<py::int_>(d["dictionary_version"]));
  EXPECT_EQ(d["dictionary_version"].cast<uint64_t>(), uint64_t{1} << 63 | 5);
  EXPECT_EQ(d["dictionary_checksum"].cast<uint64_t>(), ~uint64_t{0});
  EXPECT_TRUE(py::isinstance<py::float_>(d["orthogonality_error"]));
  EXPECT_EQ(d["orthogonality_error"].cast<double>(), 1.25e-7);
  EXPECT_EQ(d["raw_bytes_sent"].cast<uint64_t>(), 1000u);
  EXPECT_TRUE(py::isinstance<py::bool_>(d["has_dictionary"]));
  EXPECT_TRUE(d["has_dictionary"].cast<bool>());

  py::dict l = d["link"];
  EXPECT_TRUE(l["connected"].cast<bool>());
  EXPECT_EQ(l["last_rtt_seconds"].cast<double>(), 0.5);
  py::dict sent = l["sent"];
  ASSERT_EQ(py::len(sent), 2u);
  py::dict frame = sent["frame"];
  EXPECT_EQ(frame["messages"].cast<uint64_t>(), 7u);
  EXPECT_EQ(frame["bytes"].cast<uint64_t>(), 7000u);
  EXPECT_EQ(py::dict(sent["ack"])["messages"].cast<uint64_t>(), 2u);
  EXPECT_EQ(py::dict(sent["ack"])["bytes"].cast<uint64_t>(), 0u);
  EXPECT_EQ(py::dict(py::dict(l["received"])["delta"])["bytes"].cast<uint64_t>(), 99u);
}

TEST(ProtoDictTest, RepeatedRecordsAreListsInOrder) {
  EnsureInterpreter();
  v1::StatsReply reply;
  reply.set_stage(1);
  for (uint32_t id : {4u, 2u}) reply.add_boundaries()->set_id(id);
  py::dict d = MessageToDict(reply);
  EXPECT_EQ(d["stage"].cast<uint32_t>(), 1u);
  py::list boundaries = d["boundaries"];
  ASSERT_EQ(py::len(boundaries), 2u);
  EXPECT_EQ(py::dict(boundaries[0])["id"].cast<uint32_t>(), 4u);
  EXPECT_EQ(py::dict(boundaries[1])["id"].cast<uint32_t>(), 2u);
  EXPECT_EQ(py::len(MessageToDict(v1::StepReply())["boundaries"]), 0u);
}

TEST(ProtoDictTest, EnumsAreNamesAndUnknownNumbersStayNumbers) {
  EnsureInterpreter();
  v1::TensorRef ref;
  ref.set_dtype(v1::DTYPE_BF16);
  EXPECT_EQ(MessageToDict(ref)["dtype"].cast<std::string>(), "DTYPE_BF16");
  EXPECT_EQ(MessageToDict(v1::TensorRef())["dtype"].cast<std::string>(), "DTYPE_UNSPECIFIED");
  ref.set_dtype(static_cast<v1::DType>(99));  // proto3 enums are open
  py::object unknown = MessageToDict(ref)["dtype"];
  ASSERT_TRUE(py::isinstance<py::int_>(unknown));
  EXPECT_EQ(unknown.cast<int>(), 99);
}

TEST(ProtoDictTest, BytesFloatsAndRepeatedScalars) {
  EnsureInterpreter();
  v1::DictionaryTableRows rows;
  rows.add_rows(9);
  rows.add_rows(1);
  rows.set_data(std::string("\xff\x00\x80", 3));  // not UTF-8: must arrive as bytes
  py::dict d = MessageToDict(rows);
  EXPECT_EQ(d["rows"].cast<std::vector<uint32_t>>(), (std::vector<uint32_t>{9, 1}));
  ASSERT_TRUE(py::isinstance<py::bytes>(d["data"]));
  EXPECT_EQ(d["data"].cast<std::string>(), std::string("\xff\x00\x80", 3));

  v1::BoundaryConfig config;
  config.set_projector_lr(0.25f);
  config.set_method(v1::METHOD_DENSE);
  py::dict c = MessageToDict(config);
  EXPECT_TRUE(py::isinstance<py::float_>(c["projector_lr"]));
  EXPECT_EQ(c["projector_lr"].cast<double>(), 0.25);
  EXPECT_EQ(c["method"].cast<std::string>(), "METHOD_DENSE");
  EXPECT_EQ(c["peer_address"].cast<std::string>(), "");
}

}  // namespace
}  // namespace client
}  // namespace mapl
