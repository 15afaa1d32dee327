#include "client/python/proto_dict.h"

#include <string>

#include "common/check.h"
#include "google/protobuf/descriptor.h"

namespace mapl {
namespace client {
namespace {

namespace py = pybind11;
using google::protobuf::Descriptor;
using google::protobuf::EnumValueDescriptor;
using google::protobuf::FieldDescriptor;
using google::protobuf::Message;
using google::protobuf::Reflection;

py::object EnumValue(const FieldDescriptor* field, int number) {
  const EnumValueDescriptor* value = field->enum_type()->FindValueByNumber(number);
  // proto3 enums are open: a newer peer may send a number this build has no name for.
  if (value == nullptr) return py::int_(number);
  return py::str(value->name());
}

// The value of a singular field (index < 0) or of element `index` of a repeated one.
py::object FieldValue(const Message& m, const FieldDescriptor* field, int index) {
  const Reflection& r = *m.GetReflection();
  const bool repeated = index >= 0;
  switch (field->cpp_type()) {
    case FieldDescriptor::CPPTYPE_INT32:
      return py::int_(repeated ? r.GetRepeatedInt32(m, field, index) : r.GetInt32(m, field));
    case FieldDescriptor::CPPTYPE_INT64:
      return py::int_(repeated ? r.GetRepeatedInt64(m, field, index) : r.GetInt64(m, field));
    case FieldDescriptor::CPPTYPE_UINT32:
      return py::int_(repeated ? r.GetRepeatedUInt32(m, field, index) : r.GetUInt32(m, field));
    case FieldDescriptor::CPPTYPE_UINT64:
      return py::int_(repeated ? r.GetRepeatedUInt64(m, field, index) : r.GetUInt64(m, field));
    case FieldDescriptor::CPPTYPE_DOUBLE:
      return py::float_(repeated ? r.GetRepeatedDouble(m, field, index) : r.GetDouble(m, field));
    case FieldDescriptor::CPPTYPE_FLOAT:
      return py::float_(repeated ? r.GetRepeatedFloat(m, field, index) : r.GetFloat(m, field));
    case FieldDescriptor::CPPTYPE_BOOL:
      return py::bool_(repeated ? r.GetRepeatedBool(m, field, index) : r.GetBool(m, field));
    case FieldDescriptor::CPPTYPE_ENUM:
      return EnumValue(
          field, repeated ? r.GetRepeatedEnumValue(m, field, index) : r.GetEnumValue(m, field));
    case FieldDescriptor::CPPTYPE_STRING: {
      std::string scratch;
      const std::string& s = repeated ? r.GetRepeatedStringReference(m, field, index, &scratch)
                                      : r.GetStringReference(m, field, &scratch);
      if (field->type() == FieldDescriptor::TYPE_BYTES) return py::bytes(s);
      return py::str(s);  // proto3 strings are valid UTF-8: parsing checks it.
    }
    case FieldDescriptor::CPPTYPE_MESSAGE:
      // An unset singular message reads as its default instance: a dict of defaults.
      return MessageToDict(repeated ? r.GetRepeatedMessage(m, field, index)
                                    : r.GetMessage(m, field));
  }
  MAPL_CHECK(false,
             "a protobuf field of a C++ type this converter does not know: " + field->full_name());
  return py::none();
}

// A map field: reflection sees it as a repeated field of (key, value) entry messages.
py::dict MapValue(const Message& m, const FieldDescriptor* field) {
  const Reflection& r = *m.GetReflection();
  const Descriptor* entry = field->message_type();
  const FieldDescriptor* key = entry->map_key();
  const FieldDescriptor* value = entry->map_value();
  py::dict out;
  const int n = r.FieldSize(m, field);
  for (int i = 0; i < n; ++i) {
    const Message& e = r.GetRepeatedMessage(m, field, i);
    out[FieldValue(e, key, -1)] = FieldValue(e, value, -1);
  }
  return out;
}

}  // namespace

py::dict MessageToDict(const Message& message) {
  const Descriptor* descriptor = message.GetDescriptor();
  const Reflection& r = *message.GetReflection();
  py::dict out;
  for (int i = 0; i < descriptor->field_count(); ++i) {
    const FieldDescriptor* field = descriptor->field(i);
    const char* name = field->name().c_str();
    if (field->is_map()) {
      out[name] = MapValue(message, field);
    } else if (field->is_repeated()) {
      const int n = r.FieldSize(message, field);
      py::list values(n);
      for (int j = 0; j < n; ++j) values[j] = FieldValue(message, field, j);
      out[name] = std::move(values);
    } else {
      out[name] = FieldValue(message, field, -1);
    }
  }
  return out;
}

}  // namespace client
}  // namespace mapl
