package esm2

import (
	"fmt"
	"strings"

	esm2v1 "esm2service/esm2/v1"
)

// response is what EncodeResponse and PredictResponse share: the same fields.
type response interface {
	GetSequenceIndex() int32
	GetChunk() *esm2v1.TensorChunk
	GetComplete() *esm2v1.ItemComplete
}

type tensorKey struct {
	kind  esm2v1.Include
	layer int32
}

// completedItem is one item's decoded tensors and its closing ItemComplete.
type completedItem struct {
	tensors  map[tensorKey]Tensor
	complete *esm2v1.ItemComplete
}

// streamAssembler rebuilds the items of one response stream, checking every rule
// of the wire format (protos/README.md, "Reassembling a response").
type streamAssembler struct {
	items   int
	pending map[int32]map[tensorKey]*tensorAssembler
	done    map[int32]completedItem
}

func newStreamAssembler(items int) *streamAssembler {
	return &streamAssembler{
		items:   items,
		pending: map[int32]map[tensorKey]*tensorAssembler{},
		done:    map[int32]completedItem{},
	}
}

func (s *streamAssembler) add(message response) error {
	index := message.GetSequenceIndex()
	if index < 0 || int(index) >= s.items {
		return streamError("sequence_index %d outside the request's %d items", index, s.items)
	}
	if _, finished := s.done[index]; finished {
		return streamError("item %d: message after its ItemComplete", index)
	}
	if chunk := message.GetChunk(); chunk != nil {
		return s.addChunk(index, chunk)
	}
	if complete := message.GetComplete(); complete != nil {
		return s.complete(index, complete)
	}
	return streamError("item %d: a response with neither chunk nor complete", index)
}

func (s *streamAssembler) addChunk(index int32, chunk *esm2v1.TensorChunk) error {
	key := tensorKey{chunk.GetKind(), chunk.GetLayer()}
	tensors := s.pending[index]
	if tensors == nil {
		tensors = map[tensorKey]*tensorAssembler{}
		s.pending[index] = tensors
	}
	assembler := tensors[key]
	if assembler == nil {
		var err error
		if assembler, err = newTensorAssembler(chunk.GetTensor()); err != nil {
			return streamError("item %d %s layer %d: bad chunk: %v", index, kindName(key.kind), key.layer, err)
		}
		tensors[key] = assembler
	}
	if err := assembler.add(chunk); err != nil {
		return streamError("item %d %s layer %d: bad chunk: %v", index, kindName(key.kind), key.layer, err)
	}
	return nil
}

func (s *streamAssembler) complete(index int32, complete *esm2v1.ItemComplete) error {
	item := completedItem{tensors: map[tensorKey]Tensor{}, complete: complete}
	for key, assembler := range s.pending[index] {
		if !assembler.complete() {
			return streamError("item %d: %s layer %d incomplete at the item's ItemComplete (%d of %d bytes)",
				index, kindName(key.kind), key.layer, assembler.covered(), len(assembler.buffer))
		}
		item.tensors[key] = assembler.tensor()
	}
	delete(s.pending, index)
	s.done[index] = item
	return nil
}

// finish returns the items in request order once the stream has ended.
func (s *streamAssembler) finish() ([]completedItem, error) {
	var missing []int
	for i := 0; i < s.items; i++ {
		if _, ok := s.done[int32(i)]; !ok {
			missing = append(missing, i)
		}
	}
	if len(missing) > 0 {
		return nil, streamError("stream ended before items %v were complete", missing)
	}
	items := make([]completedItem, s.items)
	for i := range items {
		items[i] = s.done[int32(i)]
	}
	return items, nil
}

// single returns the item's only tensor of `kind`, if any.
func (item completedItem) single(kind esm2v1.Include) (*Tensor, error) {
	var found []Tensor
	for key, tensor := range item.tensors {
		if key.kind == kind {
			found = append(found, tensor)
		}
	}
	switch len(found) {
	case 0:
		return nil, nil
	case 1:
		return &found[0], nil
	}
	return nil, streamError("%d %s tensors in one item", len(found), kindName(kind))
}

func (item completedItem) byLayer(kind esm2v1.Include) map[int]Tensor {
	out := map[int]Tensor{}
	for key, tensor := range item.tensors {
		if key.kind == kind {
			out[int(key.layer)] = tensor
		}
	}
	return out
}

func kindName(kind esm2v1.Include) string {
	name, ok := esm2v1.Include_name[int32(kind)]
	if !ok {
		return fmt.Sprint(int32(kind))
	}
	return strings.ToLower(strings.TrimPrefix(name, "INCLUDE_"))
}

// StreamError means the server's response stream broke the wire format's rules.
type StreamError struct{ Message string }

func (e *StreamError) Error() string { return "esm2: malformed response: " + e.Message }

func streamError(format string, args ...interface{}) error {
	return &StreamError{Message: fmt.Sprintf(format, args...)}
}
