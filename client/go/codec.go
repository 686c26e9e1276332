package esm2

import (
	"fmt"

	"google.golang.org/protobuf/proto"
)

// messageCodec marshals the generated messages (protobuf's Go API v2) itself. The
// gRPC library this client builds with offline (Debian's grpc-go 1.33) marshals
// through the older github.com/golang/protobuf 1.3, which cannot read API v2
// messages; the bytes on the wire are the same either way.
type messageCodec struct{}

func (messageCodec) Marshal(v interface{}) ([]byte, error) {
	message, ok := v.(proto.Message)
	if !ok {
		return nil, fmt.Errorf("esm2: cannot marshal %T", v)
	}
	return proto.Marshal(message)
}

func (messageCodec) Unmarshal(data []byte, v interface{}) error {
	message, ok := v.(proto.Message)
	if !ok {
		return fmt.Errorf("esm2: cannot unmarshal into %T", v)
	}
	return proto.Unmarshal(data, message)
}

// Name is "proto": the content subtype stays application/grpc+proto.
func (messageCodec) Name() string { return "proto" }
