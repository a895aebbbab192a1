package manifest

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"sort"
	"strings"
)

// Unsupported marks a field meshproxy recognises but cannot honour. Its `why`
// struct tag says why; a document that sets it is refused with an error
// naming the field.
type Unsupported struct{}

// Ignored marks a field accepted and not used (Kubernetes bookkeeping such as
// metadata.uid or status).
type Ignored struct{}

var (
	unsupportedType = reflect.TypeFor[Unsupported]()
	ignoredType     = reflect.TypeFor[Ignored]()
	unmarshalerType = reflect.TypeFor[json.Unmarshaler]()
)

// FieldError is a problem at one field path of a document.
type FieldError struct {
	Path string // e.g. spec.servers[0].port.number; "" for the whole document
	Msg  string
}

func (e *FieldError) Error() string {
	if e.Path == "" {
		return e.Msg
	}
	return e.Path + ": " + e.Msg
}

// Errorf returns a *FieldError at path.
func Errorf(path, format string, args ...any) error {
	return &FieldError{Path: path, Msg: fmt.Sprintf(format, args...)}
}

// Decode decodes the JSON value raw into dst (a pointer), refusing unknown
// and Unsupported fields. Keys are matched case-sensitively against the json
// tags, as the Kubernetes API server does; path prefixes every error's field
// path.
func Decode(path string, raw []byte, dst any) error {
	return decodeValue(path, raw, reflect.ValueOf(dst).Elem())
}

// IsNull reports whether raw is absent or JSON null.
func IsNull(raw []byte) bool {
	return len(raw) == 0 || bytes.Equal(bytes.TrimSpace(raw), []byte("null"))
}

func decodeValue(path string, raw []byte, v reflect.Value) error {
	if IsNull(raw) {
		return nil
	}
	t := v.Type()
	if t == ignoredType {
		return nil
	}
	if reflect.PointerTo(t).Implements(unmarshalerType) {
		return decodeLeaf(path, raw, v)
	}
	switch t.Kind() {
	case reflect.Pointer:
		p := reflect.New(t.Elem())
		if err := decodeValue(path, raw, p.Elem()); err != nil {
			return err
		}
		v.Set(p)
		return nil
	case reflect.Struct:
		return decodeStruct(path, raw, v)
	case reflect.Slice:
		var items []json.RawMessage
		if err := json.Unmarshal(raw, &items); err != nil {
			return Errorf(path, "want a list, got %s", jsonKind(raw))
		}
		s := reflect.MakeSlice(t, len(items), len(items))
		for i, item := range items {
			if err := decodeValue(fmt.Sprintf("%s[%d]", path, i), item, s.Index(i)); err != nil {
				return err
			}
		}
		v.Set(s)
		return nil
	case reflect.Map:
		if t.Key().Kind() != reflect.String {
			return fmt.Errorf("%s: internal: map key %s", path, t.Key())
		}
		var items map[string]json.RawMessage
		if err := json.Unmarshal(raw, &items); err != nil {
			return Errorf(path, "want a mapping, got %s", jsonKind(raw))
		}
		m := reflect.MakeMapWithSize(t, len(items))
		for _, k := range sortedKeys(items) {
			e := reflect.New(t.Elem()).Elem()
			if err := decodeValue(path+"["+k+"]", items[k], e); err != nil {
				return err
			}
			m.SetMapIndex(reflect.ValueOf(k).Convert(t.Key()), e)
		}
		v.Set(m)
		return nil
	}
	return decodeLeaf(path, raw, v)
}

func decodeStruct(path string, raw []byte, v reflect.Value) error {
	var items map[string]json.RawMessage
	if err := json.Unmarshal(raw, &items); err != nil {
		return Errorf(path, "want a mapping, got %s", jsonKind(raw))
	}
	t := v.Type()
	for _, k := range sortedKeys(items) {
		sub := k
		if path != "" {
			sub = path + "." + k
		}
		i := fieldIndex(t, k)
		if i < 0 {
			return Errorf(sub, "unknown field %q", k)
		}
		f := t.Field(i)
		if f.Type == unsupportedType {
			if IsNull(items[k]) {
				continue
			}
			return Errorf(sub, "not supported by meshproxy: %s", f.Tag.Get("why"))
		}
		if err := decodeValue(sub, items[k], v.Field(i)); err != nil {
			return err
		}
	}
	return nil
}

func decodeLeaf(path string, raw []byte, v reflect.Value) error {
	err := json.Unmarshal(raw, v.Addr().Interface())
	if err == nil {
		return nil
	}
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) {
		return Errorf(path, "want %s, got %s", te.Type, te.Value)
	}
	return Errorf(path, "%v", err)
}

// fieldIndex finds the struct field whose json tag name is exactly key.
func fieldIndex(t reflect.Type, key string) int {
	for i := range t.NumField() {
		name, _, _ := strings.Cut(t.Field(i).Tag.Get("json"), ",")
		if name == key {
			return i
		}
	}
	return -1
}

func jsonKind(raw []byte) string {
	s := bytes.TrimSpace(raw)
	if len(s) == 0 {
		return "nothing"
	}
	switch s[0] {
	case '{':
		return "a mapping"
	case '[':
		return "a list"
	case '"':
		return "a string"
	case 't', 'f':
		return "a boolean"
	}
	return "a number"
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
