package main

import (
	"fmt"
	mrand "math/rand/v2"
	"os"
	"sort"
	"strconv"
	"strings"
)

// measure is one figure compared between two variants (two binaries, or
// the Heroku wire and v2), measured in rounds (inRounds).
type measure struct {
	name   string // what, and its unit
	target string // the bound on the ratio of variant 1 to variant 0
	run    func(variant int) (float64, error)
}

// inRounds runs each measure for both variants in each round, back to
// back, the order alternating between rounds (and between measures): on a
// shared machine whose speed swings by 2x between minutes, only runs
// seconds apart are compared.
//
// It also returns the share of the machine's CPU time its hypervisor
// stole meanwhile (steal in /proc/stat; 0 where there is none): on a
// virtual host, a run whose neighbours were busy is told from one that
// measured the code.
func inRounds(rounds int, ms []measure) ([][2][]float64, float64, error) {
	got := make([][2][]float64, len(ms))
	steal0, total0 := cpuSteal()
	for r := range rounds {
		for i, m := range ms {
			for k := range 2 {
				v := (r + k + i) % 2
				x, err := m.run(v)
				if err != nil {
					return nil, 0, fmt.Errorf("%s, round %d: %w", m.name, r+1, err)
				}
				got[i][v] = append(got[i][v], x)
			}
		}
	}
	steal1, total1 := cpuSteal()
	if total1 <= total0 {
		return got, 0, nil
	}
	return got, float64(steal1-steal0) / float64(total1-total0), nil
}

// loudSteal is the stolen share above which a run's figures say more
// about the neighbours than about the code (runs here: at most 0.003 in
// quiet runs; 0.04-0.24 in runs whose setup ratios swung from 0.86 to
// 1.26, both ways: docs/BENCHMARKS.md).
const loudSteal = 0.01

// cpuSteal is the machine's stolen and total CPU time so far, in clock
// ticks (the first line of /proc/stat); zeros where it cannot be read.
func cpuSteal() (steal, total uint64) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 9 || f[0] != "cpu" {
		return 0, 0
	}
	for i, x := range f[1:] {
		n, err := strconv.ParseUint(x, 10, 64)
		if err != nil {
			return 0, 0
		}
		if i < 8 { // user to steal; guest time is counted in user already
			total += n
		}
		if i == 7 {
			steal = n
		}
	}
	return steal, total
}

// report prints a measure's figures for both variants and the median over
// rounds of variant 1's ratio to variant 0's beside it, with a bootstrap
// interval.
func report(m measure, labels [2]string, got [2][]float64, steal float64) {
	fmt.Printf("%s, %d rounds: median [range]\n", m.name, len(got[0]))
	for v := range 2 {
		fmt.Printf("  %-34s %8.2f [%s]\n", labels[v], median(got[v]), spreadOf(got[v]))
	}
	med, lo, hi := pairedRatio(got[1], got[0])
	fmt.Printf("  ratio per round: median %.3f, 90%% interval %.3f-%.3f; of the medians %.3f (%s)\n", med, lo, hi, median(got[1])/median(got[0]), m.target)
	loud := ""
	if steal > loudSteal {
		loud = ": a loud host, run it again"
	}
	fmt.Printf("  CPU time stolen by the hypervisor meanwhile: %.1f%%%s\n\n", 100*steal, loud)
}

// pairedRatio is the median of a[i]/b[i] and a 90% bootstrap interval of
// that median (2000 resamples of the rounds, a fixed seed so a rerun on
// the same figures prints the same interval).
func pairedRatio(a, b []float64) (med, lo, hi float64) {
	ratios := make([]float64, len(a))
	for i := range a {
		ratios[i] = a[i] / b[i]
	}
	rng := mrand.New(mrand.NewPCG(1, 2))
	meds := make([]float64, 2000)
	sample := make([]float64, len(ratios))
	for j := range meds {
		for i := range sample {
			sample[i] = ratios[rng.IntN(len(ratios))]
		}
		meds[j] = median(sample)
	}
	sort.Float64s(meds)
	return median(ratios), meds[len(meds)*5/100], meds[len(meds)*95/100]
}

func median(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	if len(s)%2 == 0 {
		return (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return s[len(s)/2]
}

func spreadOf(v []float64) string {
	lo, hi := v[0], v[0]
	for _, x := range v {
		lo, hi = min(lo, x), max(hi, x)
	}
	return fmt.Sprintf("%.1f-%.1f", lo, hi)
}
