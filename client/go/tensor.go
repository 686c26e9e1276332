package esm2

import (
	"encoding/binary"
	"fmt"
	"math"
	"sort"

	esm2v1 "esm2service/esm2/v1"
)

// Tensor is a decoded result tensor: float32 values in C order, whatever dtype it
// travelled in (float16 and bfloat16 widen to float32 exactly).
type Tensor struct {
	Shape []int
	Data  []float32
}

// At returns the element at the given indices (one per dimension).
func (t Tensor) At(index ...int) float32 {
	flat := 0
	for axis, i := range index {
		flat = flat*t.Shape[axis] + i
	}
	return t.Data[flat]
}

func elementSize(dtype esm2v1.Dtype) (int, error) {
	switch dtype {
	case esm2v1.Dtype_DTYPE_UNSPECIFIED, esm2v1.Dtype_DTYPE_FLOAT32:
		return 4, nil
	case esm2v1.Dtype_DTYPE_FLOAT16, esm2v1.Dtype_DTYPE_BFLOAT16:
		return 2, nil
	}
	return 0, fmt.Errorf("unknown tensor dtype %d", dtype)
}

func resolveDtype(dtype esm2v1.Dtype) esm2v1.Dtype {
	if dtype == esm2v1.Dtype_DTYPE_UNSPECIFIED {
		return esm2v1.Dtype_DTYPE_FLOAT32
	}
	return dtype
}

// tensorAssembler rebuilds one tensor from chunks that may arrive in any order.
type tensorAssembler struct {
	dtype  esm2v1.Dtype
	shape  []int64
	buffer []byte
	ranges map[int64]int64 // offset -> length of every chunk received
}

func newTensorAssembler(tensor *esm2v1.Tensor) (*tensorAssembler, error) {
	size, err := elementSize(tensor.GetDtype())
	if err != nil {
		return nil, err
	}
	elements := int64(1)
	for _, dim := range tensor.GetShape() {
		if dim < 0 {
			return nil, fmt.Errorf("negative dimension in shape %v", tensor.GetShape())
		}
		elements *= dim
	}
	return &tensorAssembler{
		dtype:  resolveDtype(tensor.GetDtype()),
		shape:  append([]int64(nil), tensor.GetShape()...),
		buffer: make([]byte, elements*int64(size)),
		ranges: map[int64]int64{},
	}, nil
}

func (a *tensorAssembler) add(chunk *esm2v1.TensorChunk) error {
	tensor := chunk.GetTensor()
	if resolveDtype(tensor.GetDtype()) != a.dtype || !sameShape(tensor.GetShape(), a.shape) {
		return fmt.Errorf("chunk disagrees with the tensor's dtype or shape")
	}
	data := tensor.GetData()
	start, end := chunk.GetOffset(), chunk.GetOffset()+int64(len(data))
	if start < 0 || end > int64(len(a.buffer)) {
		return fmt.Errorf("chunk bytes [%d, %d) outside tensor of %d", start, end, len(a.buffer))
	}
	copy(a.buffer[start:end], data)
	if int64(len(data)) > a.ranges[start] {
		a.ranges[start] = int64(len(data))
	}
	return nil
}

// covered is how many bytes from offset 0 the chunks cover without a gap.
func (a *tensorAssembler) covered() int64 {
	offsets := make([]int64, 0, len(a.ranges))
	for offset := range a.ranges {
		offsets = append(offsets, offset)
	}
	sort.Slice(offsets, func(i, j int) bool { return offsets[i] < offsets[j] })
	covered := int64(0)
	for _, offset := range offsets {
		if offset > covered {
			break
		}
		if end := offset + a.ranges[offset]; end > covered {
			covered = end
		}
	}
	return covered
}

func (a *tensorAssembler) complete() bool { return a.covered() == int64(len(a.buffer)) }

func (a *tensorAssembler) tensor() Tensor {
	shape := make([]int, len(a.shape))
	for i, dim := range a.shape {
		shape[i] = int(dim)
	}
	return Tensor{Shape: shape, Data: decodeFloats(a.buffer, a.dtype)}
}

// decodeFloats turns little-endian float32, float16 or bfloat16 bytes into float32.
func decodeFloats(data []byte, dtype esm2v1.Dtype) []float32 {
	if dtype == esm2v1.Dtype_DTYPE_FLOAT32 {
		out := make([]float32, len(data)/4)
		for i := range out {
			out[i] = math.Float32frombits(binary.LittleEndian.Uint32(data[4*i:]))
		}
		return out
	}
	out := make([]float32, len(data)/2)
	for i := range out {
		bits := binary.LittleEndian.Uint16(data[2*i:])
		if dtype == esm2v1.Dtype_DTYPE_BFLOAT16 {
			out[i] = math.Float32frombits(uint32(bits) << 16)
		} else {
			out[i] = float16ToFloat32(bits)
		}
	}
	return out
}

// float16ToFloat32 widens an IEEE 754 binary16 value exactly.
func float16ToFloat32(bits uint16) float32 {
	sign := uint32(bits>>15) << 31
	exponent := uint32(bits>>10) & 0x1f
	mantissa := uint32(bits) & 0x3ff
	switch {
	case exponent == 0x1f: // infinity or NaN
		return math.Float32frombits(sign | 0x7f800000 | mantissa<<13)
	case exponent != 0: // normal
		return math.Float32frombits(sign | (exponent+112)<<23 | mantissa<<13)
	case mantissa == 0: // signed zero
		return math.Float32frombits(sign)
	}
	// Subnormal: mantissa * 2^-24, exact in float32.
	value := float32(mantissa) * float32(math.Ldexp(1, -24))
	if sign != 0 {
		return -value
	}
	return value
}

func sameShape(a, b []int64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
