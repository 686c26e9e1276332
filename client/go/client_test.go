package esm2

import (
	"context"
	"encoding/binary"
	"math"
	"net"
	"os"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"

	esm2v1 "esm2service/esm2/v1"
)

// ---------------------------------------------------------------------------------
// Decoding and reassembly, without a service.

func TestFloat16WidensExactly(t *testing.T) {
	cases := map[uint16]float32{
		0x3c00: 1, 0xc000: -2, 0x3555: 0.333251953125, 0x7bff: 65504,
		0x0001: float32(math.Ldexp(1, -24)), 0x03ff: float32(1023 * math.Ldexp(1, -24)),
		0x8000: float32(math.Copysign(0, -1)), 0x7c00: float32(math.Inf(1)),
	}
	for bits, want := range cases {
		if got := float16ToFloat32(bits); got != want || math.Signbit(float64(got)) != math.Signbit(float64(want)) {
			t.Errorf("float16 %#04x: got %v, want %v", bits, got, want)
		}
	}
	if got := float16ToFloat32(0x7e00); !math.IsNaN(float64(got)) {
		t.Errorf("float16 NaN: got %v", got)
	}
}

func TestBfloat16IsTheUpperHalfOfFloat32(t *testing.T) {
	got := decodeFloats([]byte{0x80, 0x3f, 0x49, 0xc0}, esm2v1.Dtype_DTYPE_BFLOAT16)
	if got[0] != 1 || got[1] != math.Float32frombits(0xc0490000) {
		t.Errorf("bfloat16: got %v", got)
	}
}

func chunk(offset int64, data []byte, shape ...int64) *esm2v1.TensorChunk {
	return &esm2v1.TensorChunk{
		Kind: esm2v1.Include_INCLUDE_CONTACTS, Offset: offset,
		Tensor: &esm2v1.Tensor{Dtype: esm2v1.Dtype_DTYPE_FLOAT32, Shape: shape, Data: data},
	}
}

func TestChunksReassembleInAnyOrderAndGapsAreCaught(t *testing.T) {
	one, two := []byte{0, 0, 128, 63}, []byte{0, 0, 0, 64} // 1.0, 2.0
	assembler, err := newTensorAssembler(chunk(4, two, 1, 2).GetTensor())
	if err != nil {
		t.Fatal(err)
	}
	if err := assembler.add(chunk(4, two, 1, 2)); err != nil || assembler.complete() {
		t.Fatalf("half a tensor: err %v, complete %v", err, assembler.complete())
	}
	if err := assembler.add(chunk(0, one, 1, 2)); err != nil || !assembler.complete() {
		t.Fatalf("whole tensor: err %v, complete %v", err, assembler.complete())
	}
	if got := assembler.tensor(); got.At(0, 1) != 2 || len(got.Shape) != 2 {
		t.Errorf("tensor %+v", got)
	}
	if err := assembler.add(chunk(6, two, 1, 2)); err == nil {
		t.Error("a chunk past the end was accepted")
	}
	if err := assembler.add(chunk(0, one, 2, 1)); err == nil {
		t.Error("a chunk of another shape was accepted")
	}
}

func TestStreamRulesAreEnforced(t *testing.T) {
	done := &esm2v1.EncodeResponse{Payload: &esm2v1.EncodeResponse_Complete{Complete: &esm2v1.ItemComplete{}}}
	half := &esm2v1.EncodeResponse{Payload: &esm2v1.EncodeResponse_Chunk{Chunk: chunk(0, []byte{0, 0, 128, 63}, 2)}}
	s := newStreamAssembler(1)
	if err := s.add(half); err != nil {
		t.Fatal(err)
	}
	if err := s.add(done); err == nil || !strings.Contains(err.Error(), "incomplete at the item's ItemComplete") {
		t.Errorf("incomplete tensor at ItemComplete: %v", err)
	}
	if err := newStreamAssembler(1).add(&esm2v1.EncodeResponse{SequenceIndex: 1}); err == nil {
		t.Error("a sequence_index outside the request was accepted")
	}
	if _, err := newStreamAssembler(2).finish(); err == nil {
		t.Error("a stream without ItemCompletes was accepted")
	}
}

func TestViolationsAreRenumberedForTheCallersList(t *testing.T) {
	if got := shiftItem("items[3].sequence", 16); got != "items[19].sequence" {
		t.Errorf("got %q", got)
	}
	if got := shiftItem("params.repr_layers[0]", 16); got != "params.repr_layers[0]" {
		t.Errorf("got %q", got)
	}
	if got := CodeName(codes.InvalidArgument); got != "INVALID_ARGUMENT" {
		t.Errorf("got %q", got)
	}
}

// ---------------------------------------------------------------------------------
// ---------------------------------------------------------------------------------
// Against a server from before the packed methods, in this process.

// olderServer serves Encode only (a mean tensor [index, 1] per item) and records calls.
type olderServer struct {
	esm2v1.UnimplementedEsm2ServiceServer
	mutex sync.Mutex
	calls []string
}

func (s *olderServer) record(method string) {
	s.mutex.Lock()
	defer s.mutex.Unlock()
	s.calls = append(s.calls, method)
}

func (s *olderServer) Encode(request *esm2v1.EncodeRequest, call esm2v1.Esm2Service_EncodeServer) error {
	s.record("Encode")
	for i := range request.GetItems() {
		data := make([]byte, 8)
		binary.LittleEndian.PutUint32(data, math.Float32bits(float32(i)))
		binary.LittleEndian.PutUint32(data[4:], math.Float32bits(1))
		mean := &esm2v1.TensorChunk{Kind: esm2v1.Include_INCLUDE_MEAN, Layer: 6,
			Tensor: &esm2v1.Tensor{Dtype: esm2v1.Dtype_DTYPE_FLOAT32, Shape: []int64{2}, Data: data}}
		chunk := &esm2v1.EncodeResponse{SequenceIndex: int32(i), Payload: &esm2v1.EncodeResponse_Chunk{Chunk: mean}}
		done := &esm2v1.EncodeResponse{SequenceIndex: int32(i),
			Payload: &esm2v1.EncodeResponse_Complete{Complete: &esm2v1.ItemComplete{}}}
		if err := call.Send(chunk); err != nil {
			return err
		}
		if err := call.Send(done); err != nil {
			return err
		}
	}
	return nil
}

func (s *olderServer) EncodePacked(request *esm2v1.EncodePackedRequest, call esm2v1.Esm2Service_EncodePackedServer) error {
	s.record("EncodePacked")
	return s.UnimplementedEsm2ServiceServer.EncodePacked(request, call)
}

// serverCodec is messageCodec under the older interface grpc.CustomCodec takes.
type serverCodec struct{ messageCodec }

func (serverCodec) String() string { return "proto" }

func TestAServerWithoutThePackedMethodsGetsPlainCallsFromThenOn(t *testing.T) {
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	server := grpc.NewServer(grpc.CustomCodec(serverCodec{}))
	older := &olderServer{}
	esm2v1.RegisterEsm2ServiceServer(server, older)
	go server.Serve(listener)
	defer server.Stop()
	client, err := Dial(listener.Addr().String(), Options{MaxConcurrency: 1, Timeout: 30 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	sequences := make([]string, 10) // two requests: 8, then 2
	for i := range sequences {
		sequences[i] = "MKV"
	}
	first, err := client.Encode(context.Background(), sequences, EncodeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	again, err := client.Encode(context.Background(), []string{"MKV"}, EncodeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"EncodePacked", "Encode", "Encode", "Encode"}; !reflect.DeepEqual(older.calls, want) {
		t.Errorf("calls %v, want %v", older.calls, want)
	}
	var firsts []float32
	for _, result := range first {
		firsts = append(firsts, result.Embeddings[6].At(0))
	}
	if want := []float32{0, 1, 2, 3, 4, 5, 6, 7, 0, 1}; !reflect.DeepEqual(firsts, want) {
		t.Errorf("first values %v, want %v", firsts, want)
	}
	if got := again[0].Embeddings[6].Data; !reflect.DeepEqual(got, []float32{0, 1}) {
		t.Errorf("again %v", got)
	}
}

// Against a live service: ESM2_TARGET (and ESM2_TOKEN when it requires one). The
// repository's test command (make test) starts one and sets both.

func live(t *testing.T, token string) *Client {
	target := os.Getenv("ESM2_TARGET")
	if target == "" {
		t.Skip("ESM2_TARGET is unset: no live service (make test starts one)")
	}
	client, err := Dial(target, Options{Token: token, Timeout: 2 * time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	return client
}

func TestEncodeSplitsLongListsAndKeepsTheirOrder(t *testing.T) {
	client := live(t, os.Getenv("ESM2_TOKEN"))
	sequences := make([]string, 19)
	for i := range sequences {
		sequences[i] = strings.Repeat("MKV", 1) + strings.Repeat("A", i)
	}
	all := []string{"mean", "per_token", "bos", "contacts", "logits", "attentions"}
	results, err := client.Encode(context.Background(), sequences, EncodeOptions{Include: all, ReprLayers: []int{-1, 0}})
	if err != nil {
		t.Fatal(err)
	}
	if len(results) != len(sequences) {
		t.Fatalf("%d results for %d sequences", len(results), len(sequences))
	}
	for i, result := range results {
		length := len(sequences[i])
		if result.SequenceIndex != i {
			t.Errorf("result %d has index %d", i, result.SequenceIndex)
		}
		if len(result.Embeddings) != 2 || result.PerToken[6].Shape[0] != length || result.PerToken[0].Shape[0] != length {
			t.Errorf("item %d: layers %v, per-token shapes %v", i, len(result.Embeddings), result.PerToken[6].Shape)
		}
		if result.Contacts.Shape[0] != length || result.Contacts.Shape[1] != length {
			t.Errorf("item %d: contacts %v", i, result.Contacts.Shape)
		}
		if result.Logits.Shape[0] != length || result.Logits.Shape[1] != 33 || len(result.VocabTokens) != 33 {
			t.Errorf("item %d: logits %v", i, result.Logits.Shape)
		}
		if a := result.Attentions.Shape; len(a) != 3 || a[1] != length || a[2] != length {
			t.Errorf("item %d: attentions %v", i, a)
		}
		if !result.Model.GetRandomWeights() {
			t.Errorf("item %d: the test service runs random weights, the result says not", i)
		}
	}
}

func TestPredictReturnsOneRowPerMask(t *testing.T) {
	client := live(t, os.Getenv("ESM2_TOKEN"))
	results, err := client.Predict(context.Background(), []string{"MK<mask>AY<mask>", "<mask>"}, "bfloat16")
	if err != nil {
		t.Fatal(err)
	}
	if rows := results[0].Logits.Shape; rows[0] != 2 || rows[1] != 33 || results[1].Logits.Shape[0] != 1 {
		t.Errorf("logits shapes %v, %v", rows, results[1].Logits.Shape)
	}
	if got := strings.Join(results[0].SequenceTokens, ""); got != "MK<mask>AY<mask>" {
		t.Errorf("sequence tokens %q", got)
	}
}

func TestInvalidItemsOfEveryRequestAreNamedInTheCallersList(t *testing.T) {
	client := live(t, os.Getenv("ESM2_TOKEN"))
	sequences := []string{"MKV", "MKV", "MKV", "MKJ", "MKV", "MKV", "MKV", "MKV", "MKV", "MKV", "MK<mask>V", "MKV"}
	_, err := client.Encode(context.Background(), sequences, EncodeOptions{})
	refusal, ok := err.(*Error)
	if !ok || refusal.Code != codes.InvalidArgument {
		t.Fatalf("want INVALID_ARGUMENT, got %v", err)
	}
	if len(refusal.Violations) != 2 || refusal.Violations[0].Field != "items[3].sequence" || refusal.Violations[1].Field != "items[10].sequence" {
		t.Errorf("violations %+v", refusal.Violations)
	}
	if len(refusal.RequestIDs) != 2 {
		t.Errorf("request ids %v: want one per refused request", refusal.RequestIDs)
	}
}

func TestAServiceWithTokensRefusesACallWithout(t *testing.T) {
	if os.Getenv("ESM2_TOKEN") == "" {
		t.Skip("ESM2_TOKEN is unset: the service requires no token")
	}
	_, err := live(t, "").Status(context.Background())
	if refusal, ok := err.(*Error); !ok || refusal.Code != codes.Unauthenticated {
		t.Fatalf("want UNAUTHENTICATED, got %v", err)
	}
	status, err := live(t, os.Getenv("ESM2_TOKEN")).Status(context.Background())
	if err != nil || len(status.GetWorkers()) == 0 {
		t.Fatalf("status with the token: %v, %v", status, err)
	}
}
