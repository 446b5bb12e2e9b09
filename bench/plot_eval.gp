# Error against rho, one line per policy, from the CSV of `medakv eval --csv`
# (header policy,rho,kept_fraction,mean_rel_error; docs/evaluation.md).
#
#   gnuplot -e "csv='eval.csv'; png='eval.png'" bench/plot_eval.gp
#
# Optional: title='...' (the plot's title). The y axis is logarithmic, so
# runs with error 0 (policy full, or rho = 1) are left out of the plot, and a
# policy with no other run gets no line.
if (!exists("csv")) { print "usage: gnuplot -e \"csv='eval.csv'; png='eval.png'\" bench/plot_eval.gp"; exit status 1 }
if (!exists("png")) { png = csv . ".png" }
if (!exists("title")) { title = "medakv eval: attention-output error on held-out queries" }

# Policies with an error > 0, in the order of their first row (the CSV keeps
# the order of --policies).
policies = system(sprintf("awk -F, 'NR > 1 && $4 > 0 && !seen[$1]++ { printf \"%%s \", $1 }' '%s'", csv))
if (strlen(policies) == 0) { print sprintf("%s: no row with an error > 0", csv); exit status 1 }

set terminal pngcairo size 900,600 noenhanced font ",11"
set output png
set datafile separator ","
set title title
set xlabel "rho (fraction of the cache kept)"
set ylabel "mean relative error ||o' - o|| / ||o||"
set logscale y
set format y "%g"
set grid xtics ytics mytics
set key outside right top
set xrange [0:*]
set offsets graph 0.02, graph 0.02, 0, 0

# Rows of one policy; a non-positive error is undefined on the log axis.
plot for [p in policies] csv every ::1 \
     using 2:((strcol(1) eq p && $4 > 0) ? $4 : NaN) \
     with linespoints linewidth 2 pointsize 1.2 title p
