package deploy

import (
	"path/filepath"
	"slices"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	rbacv1 "k8s.io/api/rbac/v1"

	"github.com/meshproxy/meshproxy/cni"
	"github.com/meshproxy/meshproxy/nodeagent"
)

// TestNodeAgentDaemonSet: the agent writes into the node's own CNI
// directories mounted at the same paths (so the kubeconfig it writes names
// files the plugin finds on the host), does not depend on the pod network,
// lives in a namespace the plugin never captures, and may read pods.
func TestNodeAgentDaemonSet(t *testing.T) {
	dir := filepath.Join(kubeDir, "node-agent")
	var ds *appsv1.DaemonSet
	var role *rbacv1.ClusterRole
	var binding *rbacv1.ClusterRoleBinding
	for _, f := range []string{"daemonset.yaml", "rbac.yaml"} {
		for _, d := range readFileDocs(t, filepath.Join(dir, f)) {
			v, err := decodeStrict(d)
			if err != nil {
				t.Fatalf("%s: %v", d, err)
			}
			switch o := v.(type) {
			case *appsv1.DaemonSet:
				ds = o
			case *rbacv1.ClusterRole:
				role = o
			case *rbacv1.ClusterRoleBinding:
				binding = o
			}
		}
	}
	if ds == nil || role == nil || binding == nil {
		t.Fatal("node-agent needs a DaemonSet, a ClusterRole and a ClusterRoleBinding")
	}
	spec := ds.Spec.Template.Spec
	if !spec.HostNetwork {
		t.Error("the agent must not depend on the CNI it installs: hostNetwork")
	}
	if !slices.Contains(cni.DefaultExcludeNamespaces, ds.Namespace) {
		t.Errorf("namespace %s is captured by the plugin by default", ds.Namespace)
	}
	c := spec.Containers[0]
	want := map[string]string{"--bin-dir": nodeagent.DefaultBinDir, "--conf-dir": nodeagent.DefaultConfDir}
	for flag, path := range want {
		i := slices.Index(c.Args, flag)
		if i < 0 || i+1 >= len(c.Args) || c.Args[i+1] != path {
			t.Errorf("args %v: want %s %s", c.Args, flag, path)
		}
		var mounted bool
		for _, m := range c.VolumeMounts {
			for _, v := range spec.Volumes {
				if v.Name == m.Name && v.HostPath != nil && v.HostPath.Path == path && m.MountPath == path && !m.ReadOnly {
					mounted = true
				}
			}
		}
		if !mounted {
			t.Errorf("host %s is not mounted writable at the same path", path)
		}
	}
	sc := c.SecurityContext
	if sc == nil || sc.Privileged == nil || *sc.Privileged || sc.Capabilities == nil || !slices.Contains(sc.Capabilities.Drop, "ALL") {
		t.Errorf("the agent only writes files: no privilege, no capability: %+v", sc)
	}
	if len(role.Rules) != 1 || !slices.Equal(role.Rules[0].Resources, []string{"pods"}) || !slices.Equal(role.Rules[0].Verbs, []string{"get"}) {
		t.Errorf("role grants %+v; the plugin only gets pods", role.Rules)
	}
	if binding.RoleRef.Name != role.Name || len(binding.Subjects) != 1 ||
		binding.Subjects[0].Name != spec.ServiceAccountName || binding.Subjects[0].Namespace != ds.Namespace {
		t.Errorf("binding %+v does not give the role to the agent's service account", binding)
	}
}
