package gateway

import (
	"slices"
	"strconv"
	"strings"
)

// configView is the gateway configuration as GET /config shows it.
type configView struct {
	Generation  uint64           `json:"generation"`
	Listeners   []listenerView   `json:"listeners"`
	Credentials []credentialView `json:"credentials"`
}

type listenerView struct {
	Port    uint16       `json:"port"`
	Address string       `json:"address,omitempty"` // bound address
	Error   string       `json:"error,omitempty"`   // why it is not bound
	Servers []serverView `json:"servers"`
}

type serverView struct {
	Gateway    string      `json:"gateway"`
	Server     string      `json:"server"`
	Protocol   string      `json:"protocol"`
	Mode       string      `json:"mode"`
	Hosts      []string    `json:"hosts"`
	Credential string      `json:"credential,omitempty"`
	Routes     []routeView `json:"routes"`
}

type routeView struct {
	VirtualService string     `json:"virtual_service"`
	Kind           string     `json:"kind"`
	Index          int        `json:"index"`
	Match          []string   `json:"match,omitempty"`
	Destinations   []destView `json:"destinations"`
}

type destView struct {
	Address string `json:"address"`
	Weight  int    `json:"weight,omitempty"`
}

func (c *config) view() configView {
	v := configView{Generation: c.gen, Listeners: []listenerView{}, Credentials: []credentialView{}}
	for _, port := range c.sortedPorts() {
		pc := c.ports[port]
		lv := listenerView{Port: port, Servers: []serverView{}}
		for _, s := range pc.servers {
			sv := serverView{Gateway: s.gateway, Server: s.name, Protocol: s.protocol, Mode: s.mode.String(),
				Credential: s.credential, Routes: []routeView{}}
			for _, h := range s.hosts {
				sv.Hosts = append(sv.Hosts, h.ns+"/"+string(h.host))
			}
			for _, r := range s.routes {
				rv := routeView{VirtualService: r.name, Kind: r.kind, Index: r.index}
				for _, m := range r.matches {
					desc := "port " + strconv.Itoa(int(m.port))
					if m.port == 0 {
						desc = "any port"
					}
					if m.sni != nil {
						desc += ", sni " + strings.Join(hostStrings(m.sni), " ")
					}
					rv.Match = append(rv.Match, desc)
				}
				for _, d := range r.dests {
					rv.Destinations = append(rv.Destinations, destView{Address: d.addr, Weight: d.weight})
				}
				sv.Routes = append(sv.Routes, rv)
			}
			lv.Servers = append(lv.Servers, sv)
		}
		v.Listeners = append(v.Listeners, lv)
	}
	return v
}

func (c *config) sortedPorts() []uint16 {
	ports := make([]uint16, 0, len(c.ports))
	for p := range c.ports {
		ports = append(ports, p)
	}
	slices.Sort(ports)
	return ports
}
