// A protobuf message as a Python dict, by reflection: how the daemon's records (local.proto
// StepReply, StatsReply and the BoundaryStats in them) reach Python without a line of per-field
// code, so a statistic added to the proto shows up in Python with no change here.
//
//   py::dict d = mapl::client::MessageToDict(reply);   // {"stage": 1, "boundaries": [{...}]}
//
// Every field of the message's descriptor is a key, in declaration order; a field that is not set
// has its default value (0, "", False, an empty list or dict, or the dict of an empty message),
// so readers always find every field of the schema. Values:
//   integers and floating point -> int and float (64-bit integers stay exact),
//   bool -> bool, string -> str, bytes -> bytes,
//   enum -> the value's name (str), or its number (int) for a number this build does not know,
//   message -> dict (recursively), repeated -> list, map -> dict keyed by the map's keys.
// Extensions and unknown fields are left out. Call it with the GIL held.
#ifndef MAPL_CLIENT_PYTHON_PROTO_DICT_H_
#define MAPL_CLIENT_PYTHON_PROTO_DICT_H_

#include <pybind11/pybind11.h>

#include "google/protobuf/message.h"

namespace mapl {
namespace client {

pybind11::dict MessageToDict(const google::protobuf::Message& message);

}  // namespace client
}  // namespace mapl

#endif  // MAPL_CLIENT_PYTHON_PROTO_DICT_H_
